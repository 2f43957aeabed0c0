"""PagedKVCache on its own: pages, padding, residency, key pieces, errors."""

from __future__ import annotations

import math

import pytest
import torch

from pagedtensor import MemoryConfig, OutOfPagesError, Pager
from pagedtensor.hf import PagedKVCache
from pagedtensor.hf.attention import merge_partials, paged_attention
from pagedtensor.hf.cache import ACTIVE_UPDATE, streaming_config
from pagedtensor.triton_kernels import merge_attention_partials
from tests.hf.tiny_models import PAGE
from tests.support import collect_inside_first_eviction

KV_HEADS, HEADS, HEAD_DIM = 2, 4, 16


def _pager(nvme_dir, vram_pages=4, host_pages=3, slab_pages=2) -> Pager:
    return Pager(streaming_config(MemoryConfig(
        vram_limit=vram_pages * PAGE, host_memory=host_pages * PAGE, page_size=PAGE, nvme_path=nvme_dir,
        device="cpu", slab_size=slab_pages * PAGE,
    )))


def _states(batch, tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, KV_HEADS, tokens, HEAD_DIM)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def _fill(cache, layers, batch, chunks, pads=None):
    """Append ``chunks`` (token counts) to every layer; returns the dense keys/values written per layer."""
    written = [[None, None] for _ in range(layers)]
    total = 0
    for step, q_len in enumerate(chunks):
        mask = None
        if pads is not None:
            total += q_len
            mask = torch.ones(batch, total, dtype=torch.long)
            for b, pad in enumerate(pads):
                mask[b, :pad] = 0
        cache.begin_forward(mask, q_len)
        for layer in range(layers):
            keys, values = _states(batch, q_len, seed=100 * step + layer)
            cache.update(keys, values, layer)
            for i, new in enumerate((keys, values)):
                old = written[layer][i]
                written[layer][i] = new if old is None else torch.cat([old, new], dim=2)
    return written


def test_dense_kv_round_trips_through_host_and_disk(nvme_dir):
    pager = _pager(nvme_dir)
    cache = PagedKVCache(pager=pager, num_layers=2, stream_group_bytes=PAGE)
    written = _fill(cache, 2, 2, [37, 1, 1, 20])
    for layer in range(2):
        keys, values = cache.dense_kv(layer)
        assert torch.equal(keys, written[layer][0])
        assert torch.equal(values, written[layer][1])
    stats = pager.stats()
    assert stats["bytes_to_disk"] > 0 and stats["bytes_from_disk"] > 0
    assert cache.get_seq_length() == 59
    cache.close()
    assert pager.stats()["allocations"] == 0


def test_dense_kv_of_a_layer_with_no_update_yet_names_the_layer(nvme_dir):
    """A layer gets its shapes with its first update: ``dense_kv`` of one before it (a new cache, or
    one reset) raised ``AttributeError: 'NoneType' object has no attribute 'kv_heads'``."""
    cache = PagedKVCache(pager=_pager(nvme_dir), num_layers=2)
    for _ in range(2):
        with pytest.raises(ValueError, match="layer 1 holds no keys and values yet"):
            cache.dense_kv(1)
        _fill(cache, 2, 1, [3])
        assert cache.dense_kv(1)[0].shape == (1, KV_HEADS, 3, HEAD_DIM)
        cache.reset()
    cache.close()


def test_left_padding_stores_real_tokens_only(nvme_dir):
    cache = PagedKVCache(pager=_pager(nvme_dir, vram_pages=8), num_layers=1)
    written = _fill(cache, 1, 3, [30, 1], pads=[0, 5, 29])
    layer = cache.layers[0]
    assert [seq.length for seq in layer.seqs] == [31, 26, 2]
    keys, _ = cache.dense_kv(0)
    for b, pad in enumerate([0, 5, 29]):
        assert torch.equal(keys[b, :, pad:], written[0][0][b, :, pad:])
        assert not keys[b, :, :pad].any()
    mask = cache.dense_mask(0, 1)
    assert mask.shape == (3, 1, 1, 31)
    assert mask[2, 0, 0].sum() == 2


def test_right_padding_is_rejected(nvme_dir):
    cache = PagedKVCache(pager=_pager(nvme_dir), num_layers=1)
    mask = torch.tensor([[1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left padding"):
        cache.begin_forward(mask, 4)


def test_a_mask_that_hides_a_cached_token_is_rejected(nvme_dir):
    """The paged attention reads every stored token whatever the mask says: a later mask whose
    columns of cached tokens do not mark each sequence's pads then its stored tokens raises (it was
    ignored: a token masked after real ones, or a stored token hidden now, was attended)."""
    cache = PagedKVCache(pager=_pager(nvme_dir, vram_pages=8), num_layers=1)
    _fill(cache, 1, 2, [5], pads=[0, 2])
    keys, values = _states(2, 1, seed=9)
    for hidden in ([[1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], [[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1]],
                   [[1, 1, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]]):  # fmt: skip
        with pytest.raises(ValueError, match="columns of the cached tokens"):
            cache.begin_forward(torch.tensor(hidden), 1)
    assert [seq.length for seq in cache.layers[0].seqs] == [5, 3]  # nothing written
    cache.begin_forward(torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]), 1)  # the pads it has: runs
    cache.update(keys, values, 0)
    assert [seq.length for seq in cache.layers[0].seqs] == [6, 4]
    cache.close()


def test_batch_edits_of_a_layer_no_forward_updated_do_nothing(nvme_dir):
    """A layer that reuses another's keys and values (Gemma 4's shared layers) is never updated: beam
    search's reorder, select and repeat leave it be, as DynamicCache's (they raised IndexError)."""
    cache = PagedKVCache(pager=_pager(nvme_dir, vram_pages=8), num_layers=2)
    cache.begin_forward(None, 3)
    keys, values = _states(2, 3, seed=4)
    cache.update(keys, values, 0)
    cache.reorder_cache(torch.tensor([1, 1]))
    cache.batch_select_indices(torch.tensor([0]))
    cache.batch_repeat_interleave(3)
    assert len(cache.layers[0].seqs) == 3 and not cache.layers[1].is_initialized and cache.layers[1].seqs == []
    cache.close()


@pytest.mark.parametrize("decode", [True, False])
def test_paged_attention_with_pages_everywhere(decode, nvme_dir):
    """Keys spread over device slabs, host and disk: the pieces cover every key exactly once."""
    pager = _pager(nvme_dir, vram_pages=6, host_pages=3, slab_pages=2)
    cache = PagedKVCache(pager=pager, num_layers=1, stream_group_bytes=2 * PAGE, sink_pages=0)
    cache.config = type("Config", (), {"_attn_implementation": "pagedllm"})()
    chunks = [45, 1] if decode else [45, 21]
    written = _fill(cache, 1, 2, chunks)
    assert isinstance(ACTIVE_UPDATE.get().cache, PagedKVCache)
    layer = cache.layers[0]
    # scatter residency: evict every other page of each sequence
    for seq in layer.seqs:
        for allocation in seq.segments:
            for index in range(0, allocation.num_pages, 2):
                pager.evict(allocation, index, index + 1)
    q_len = chunks[-1]
    query = torch.randn(2, HEADS, q_len, HEAD_DIM, generator=torch.Generator().manual_seed(7))
    got = paged_attention(cache, 0, query, scaling=0.25)
    keys = written[0][0].repeat_interleave(HEADS // KV_HEADS, dim=1)
    values = written[0][1].repeat_interleave(HEADS // KV_HEADS, dim=1)
    total = keys.shape[2]
    visible = torch.arange(total)[None, :] <= torch.arange(total - q_len, total)[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=0.25)
    torch.testing.assert_close(got, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert cache.is_decode(0) == decode
    assert pager.stats()["bytes_from_disk"] > 0


def test_merge_partials_matches_kernel_module():
    generator = torch.Generator().manual_seed(3)
    outs = [torch.randn(2, 5, 4, 16, generator=generator) for _ in range(4)]
    lses = [torch.randn(2, 5, 4, generator=generator) for _ in range(4)]
    lses[1][0, 0] = float("-inf")
    outs[1][0, 0] = 0
    expected, _ = merge_attention_partials(outs, lses)
    torch.testing.assert_close(merge_partials(outs, lses), expected, atol=1e-6, rtol=1e-6)


def test_streaming_keeps_resident_pages_and_evicts_streamed_ones(nvme_dir):
    """Pages that were not resident are streamed through free slots and dropped; resident ones stay."""
    pager = _pager(nvme_dir, vram_pages=8, host_pages=64, slab_pages=8)
    cache = PagedKVCache(pager=pager, num_layers=2, stream_group_bytes=PAGE, sink_pages=0, hot_fraction=0.0)
    cache.config = type("Config", (), {"_attn_implementation": "pagedllm"})()
    _fill(cache, 2, 1, [16 * 6, 1])
    page_count = cache.page_count(97)
    before = {p: cache._page(cache.layers[1].seqs[0], p).device_slot for p in range(page_count)}
    query = torch.randn(1, HEADS, 1, HEAD_DIM)
    paged_attention(cache, 0, query)
    after = {p: cache._page(cache.layers[1].seqs[0], p).device_slot for p in range(page_count)}
    assert {p for p, s in before.items() if s is not None} == {p for p, s in after.items() if s is not None}
    layer0 = [cache._page(cache.layers[0].seqs[0], p).device_slot for p in range(page_count)]
    # layer 0's streamed pages were dropped again (but the last group, evicted when the next one arrives)
    assert sum(slot is not None for slot in layer0) <= cache.window_pages + 1


def test_page_size_too_small_names_the_field(nvme_dir):
    pager = Pager(MemoryConfig(vram_limit=8 * PAGE, host_memory=8 * PAGE, page_size=PAGE, device="cpu", prefetch_strategy="none"))
    cache = PagedKVCache(pager=pager, num_layers=1)
    keys = torch.zeros(1, 8, 1, 256)  # 16 KiB of K+V per token
    with pytest.raises(ValueError, match="page_size"):
        cache.update(keys, keys, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        PagedKVCache()
    with pytest.raises(ValueError, match="sink_pages"):
        PagedKVCache(num_layers=1, sink_pages=-1)
    with pytest.raises(TypeError, match="pager"):
        PagedKVCache(num_layers=1, pager="not a pager")
    with pytest.raises(ValueError, match="hot_fraction"):
        PagedKVCache(num_layers=1, hot_fraction=True)


def test_a_cache_reserves_segments_larger_than_a_pager_without_a_disk_tier():
    """A segment reserves 64 pages of page table, which take no tier memory until written: a small
    pager with no disk tier holds a short sequence (a bound on allocations by tier size refused it)."""
    pager = Pager(streaming_config(MemoryConfig(vram_limit=16 * PAGE, host_memory=8 * PAGE, page_size=PAGE, device="cpu")))
    cache = PagedKVCache(pager=pager, num_layers=2)
    written = _fill(cache, 2, 1, [37])
    for layer in range(2):
        keys, values = cache.dense_kv(layer)
        assert torch.equal(keys, written[layer][0]) and torch.equal(values, written[layer][1])
    cache.close()
    pager.close()


def test_bad_arguments_are_refused_before_a_pager_is_made(monkeypatch):
    """A bad stream_group_bytes was parsed after the cache had made its own pager, left open."""
    made = []
    monkeypatch.setattr("pagedtensor.hf.cache.Pager", lambda *args, **kwargs: made.append(args))
    with pytest.raises(ValueError, match="stream_group_bytes"):
        PagedKVCache(num_layers=1, stream_group_bytes="bogus")
    with pytest.raises(ValueError, match="either pager or memory_config"):
        PagedKVCache(num_layers=1, pager=object(), memory_config=MemoryConfig(device="cpu"))
    assert made == []


def test_select_and_crop(nvme_dir):
    cache = PagedKVCache(pager=_pager(nvme_dir, vram_pages=8), num_layers=1)
    written = _fill(cache, 1, 3, [20, 1])
    cache.crop(-1)
    assert cache.get_seq_length() == 20
    cache.batch_select_indices(torch.tensor([0, 2]))
    keys, _ = cache.dense_kv(0)
    assert torch.equal(keys, written[0][0][[0, 2], :, :20])
    cache.reorder_cache(torch.tensor([1, 1]))  # a sequence kept twice (beam search) gets a copy of its pages
    keys, _ = cache.dense_kv(0)
    assert torch.equal(keys, written[0][0][[2, 2], :, :20])
    cache.reset()
    assert cache.get_seq_length() == 0
    assert math.isclose(cache.pager.stats()["allocations"], 0)


def test_pager_evict_moves_only_unpinned_device_pages(nvme_dir):
    """Pager.evict (added for the cache): dirty pages written back, clean ones dropped, pinned ones kept."""
    pager = _pager(nvme_dir, vram_pages=4, host_pages=8)
    allocation = pager.allocate(4 * PAGE)
    data = torch.arange(4 * PAGE, dtype=torch.int32).to(torch.uint8)
    pager.write(allocation, data)
    pinned = pager.ensure_resident(allocation, 3, 4)
    assert pager.evict(allocation) == 3
    stats = pager.stats()
    assert stats["bytes_d2h"] == 3 * PAGE
    assert [info.tier for info in pager.page_table(allocation)] == ["host", "host", "host", "device"]
    with pager.ensure_resident(allocation, 0, 1):
        pass
    assert pager.evict(allocation, 0, 1) == 1
    assert pager.stats()["bytes_d2h"] == 3 * PAGE  # clean: the host copy stayed
    pinned.release()
    assert torch.equal(pager.read(allocation), data)


def test_resident_block_table_names_the_slots_pinned_after_a_concurrent_eviction(monkeypatch):
    """The one-call path reads the pages' slots only once they are pinned: here the weight prefetch
    (the pager's worker thread) evicts the KV pages between the residency check and the pins, so
    ``ensure_resident`` faults them back into other slots, where the block table must point."""
    page = 64 * 1024
    pager = Pager(MemoryConfig(vram_limit=8 * page, host_memory=64 * page, page_size=page, device="cpu", prefetch_strategy="none"))
    with pager:
        weights = pager.allocate(8 * page)  # stands in for the next layer's weights, on the host
        pager.write(weights, torch.randint(0, 256, (8 * page,), dtype=torch.uint8))
        pager.evict_all()
        cache = PagedKVCache(pager=pager, num_layers=1, sink_pages=0, hot_fraction=0.0)
        keys = torch.randn(1, 2, 300, 64, dtype=torch.float16)  # 128 tokens a page: 3 pages
        cache.update(keys, keys.clone(), 0)
        seq = cache.layers[0].seqs[0]
        assert all(cache._page(seq, p).device_slot is not None for p in range(3))
        ensure_resident = pager.ensure_resident
        prefetched = []

        def prefetch_first(*args, **kwargs):
            if not prefetched:
                prefetched.append(True)
                pager.prefetch(weights).result()  # takes every unpinned slot: the KV pages go
                ensure_resident(weights, 0, 5).release()  # and the newest weights stay
            return ensure_resident(*args, **kwargs)

        monkeypatch.setattr(pager, "ensure_resident", prefetch_first)
        pieces = cache.key_pieces(0)
        try:
            piece = next(pieces)
            pinned = [cache.slot_location(cache._page(seq, p).device_slot) for p in range(3)]
            assert [(piece.slab, local) for local in piece.block_table[0][:3]] == pinned
        finally:
            pieces.close()
            cache.close()


def test_paged_attention_after_reset_reads_pages_in_the_new_geometry(nvme_dir):
    """``reset()`` lets the cache take states of another geometry (dtype, kv heads, head size): the
    kernels' page pools, views of the device slabs in the old geometry, must be made again."""
    pager = _pager(nvme_dir, vram_pages=8, host_pages=8, slab_pages=8)
    cache = PagedKVCache(pager=pager, num_layers=1, sink_pages=0)
    cache.config = type("Config", (), {"_attn_implementation": "pagedllm"})()
    _fill(cache, 1, 2, [20, 1])
    paged_attention(cache, 0, torch.randn(2, HEADS, 1, HEAD_DIM), scaling=0.25)  # pools in fp32, 2 kv heads
    cache.reset()
    generator = torch.Generator().manual_seed(11)
    for dtype, kv_heads in ((torch.float32, 4), (torch.bfloat16, 4)):
        cache.reset()
        keys = torch.randn(2, kv_heads, 20, HEAD_DIM, generator=generator).to(dtype)
        values = torch.randn(2, kv_heads, 20, HEAD_DIM, generator=generator).to(dtype)
        cache.begin_forward(None, 20)
        cache.update(keys, values, 0)
        query = torch.randn(2, HEADS, 20, HEAD_DIM, generator=generator).to(dtype)
        got = paged_attention(cache, 0, query, scaling=0.25)
        keys, values = (t.repeat_interleave(HEADS // kv_heads, dim=1) for t in (keys, values))
        expected = torch.nn.functional.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=0.25)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, expected.transpose(1, 2), atol=tolerance, rtol=tolerance)
    cache.close()


def test_layers_of_other_shapes_keep_their_own_geometry(nvme_dir):
    """Layers whose keys have other head sizes or KV heads (Gemma 4's full-attention layers) each get
    pages of their own geometry, shared by the layers of one shape: their dense keys and the paged
    attention read each layer in its own. What assumes one geometry for every layer says so, and a
    layer's later states must keep its shape (and every layer the cache's batch)."""
    pager = _pager(nvme_dir, vram_pages=8, host_pages=8, slab_pages=4)
    cache = PagedKVCache(pager=pager, num_layers=3, sink_pages=0)
    cache.config = type("Config", (), {"_attn_implementation": "pagedllm"})()
    shapes = [(2, 16), (2, 32), (2, 16)]  # 16, 8 and 16 tokens a page
    generator = torch.Generator().manual_seed(12)
    written = [[] for _ in shapes]
    for q_len in (21, 1):
        cache.begin_forward(None, q_len)
        for layer, (kv_heads, head_dim) in enumerate(shapes):
            states = [torch.randn(2, kv_heads, q_len, head_dim, generator=generator) for _ in range(2)]
            cache.update(*states, layer)
            written[layer] = states if not written[layer] else [torch.cat(pair, dim=2) for pair in zip(written[layer], states)]
            query = torch.randn(2, HEADS, q_len, head_dim, generator=generator)
            got = paged_attention(cache, layer, query, scaling=0.25)
            keys, values = (t.repeat_interleave(HEADS // kv_heads, dim=1) for t in written[layer])
            causal = torch.ones(q_len, keys.shape[2], dtype=torch.bool).tril(keys.shape[2] - q_len)
            expected = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=causal, scale=0.25)
            torch.testing.assert_close(got, expected.transpose(1, 2), atol=1e-5, rtol=1e-5, msg=lambda m: f"layer {layer}: {m}")
    for layer in range(3):
        assert all(torch.equal(a, b) for a, b in zip(cache.dense_kv(layer), written[layer])), f"layer {layer}"
    geometries = [layer.geometry for layer in cache.layers]
    assert [(g.kv_heads, g.head_dim, g.page_tokens) for g in geometries] == [(2, 16, 16), (2, 32, 8), (2, 16, 16)]
    assert geometries[0] is geometries[2]
    assert cache.stats()["page_tokens"] == [16, 8, 16] and "page_tokens=[16, 8, 16]" in repr(cache)
    for read in (lambda: cache.page_tokens, lambda: cache.head_dim, lambda: cache.page_count(5)):
        with pytest.raises(ValueError, match=r"layers of this cache differ in (page_tokens|head_dim) \(\[(8, 16|16, 32)\]\)"):
            read()
    assert cache.num_kv_heads == 2
    with pytest.raises(ValueError, match=r"layer 1: expected keys \[batch=2, kv_heads=2, q_len, 32\] and values \[\.\.\., 32\], got \(2, 2, 1, 16\)"):
        cache.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), 1)
    cache.reset()
    cache.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    with pytest.raises(ValueError, match=r"differ from the cache's batch 2 and dtype torch.float32"):
        cache.update(torch.zeros(3, 2, 3, 32), torch.zeros(3, 2, 3, 32), 1)
    cache.close()


def test_values_of_another_head_size_than_keys_keep_their_own_size(nvme_dir):
    """DeepSeek's latent attention caches a latent (keys) and a rotary part (values) of other sizes:
    a page holds its tokens' keys, then their values, each of its own size, through host and disk;
    the paged kernels, which take one size, are refused that layer with an error, and the attention
    names it as the reason for its dense fallback. A later update must keep both sizes."""
    from pagedtensor.hf.attention import _fallback_reason

    pager = _pager(nvme_dir)
    cache = PagedKVCache(pager=pager, num_layers=2, stream_group_bytes=PAGE)
    cache.config = type("Config", (), {"_attn_implementation": "pagedllm"})()
    generator = torch.Generator().manual_seed(5)
    written = [[], []]
    for q_len in (37, 1, 20):
        cache.begin_forward(None, q_len)
        for layer, value_dim in enumerate((8, 16)):
            keys = torch.randn(2, 1, q_len, 16, generator=generator)
            values = torch.randn(2, 1, q_len, value_dim, generator=generator)
            cache.update(keys, values, layer)
            written[layer] = [keys, values] if not written[layer] else [torch.cat(pair, dim=2) for pair in zip(written[layer], (keys, values))]
    for layer in range(2):
        assert all(torch.equal(a, b) for a, b in zip(cache.dense_kv(layer), written[layer])), f"layer {layer}"
    assert [(g.head_dim, g.value_dim, g.page_tokens) for g in (layer.geometry for layer in cache.layers)] == [(16, 8, 42), (16, 16, 32)]
    assert pager.stats()["bytes_to_disk"] > 0 and pager.stats()["bytes_from_disk"] > 0
    with pytest.raises(ValueError, match="layers of this cache differ in value_dim"):
        cache.value_dim
    with pytest.raises(ValueError, match="layer 0: its values have head size 8 and its keys 16; the paged kernels take keys and values of one size"):
        cache.key_pools(0, 0)
    query = torch.randn(2, 4, 1, 16)
    assert _fallback_reason(cache, 0, query, None, 0.0, None, {}) == "values of head size 8, keys of 16"
    with pytest.raises(ValueError, match=r"layer 0: expected keys \[batch=2, kv_heads=1, q_len, 16\] and values \[\.\.\., 8\], got \(2, 1, 1, 16\) and \(2, 1, 1, 16\)"):
        cache.update(torch.zeros(2, 1, 1, 16), torch.zeros(2, 1, 1, 16), 0)
    with pytest.raises(ValueError, match=r"whose batch, kv heads and length agree \(only the head sizes may differ\)"):
        cache.update(torch.zeros(2, 1, 2, 16), torch.zeros(2, 1, 1, 8), 0)
    cache.close()
    assert pager.stats()["allocations"] == 0


def test_a_cache_collected_inside_a_pager_call_frees_its_pages_after_it(monkeypatch):
    """A cache dropped in a reference cycle, collected while the same thread evicts its pages to make
    room: its finalizer freed them there, halfway through the eviction (TypeError from the slab
    pool and two host slots leaked). Its release and frees now wait for the pager's next call."""
    import gc

    from pagedtensor import PagedTensor

    pager = Pager(MemoryConfig(page_size=PAGE, vram_limit=4 * PAGE, host_memory=8 * PAGE, slab_size=8 * PAGE, prefetch_strategy="none",
                               device="cpu"))  # fmt: skip
    gc.disable()
    try:

        class Holder:
            pass

        holder = Holder()
        holder.cycle = holder
        holder.cache = PagedKVCache(pager=pager, num_layers=1)
        with torch.no_grad():
            holder.cache.update(torch.randn(1, 2, PAGE // 128, 16), torch.randn(1, 2, PAGE // 128, 16), 0)
        del holder  # garbage, in a cycle: freed by the next collection
        collected = collect_inside_first_eviction(pager, monkeypatch)
        ones = PagedTensor.wrap(torch.ones(PAGE), pager)  # the whole device tier: evicts the cache's pages
        assert collected
    finally:
        gc.enable()
    assert torch.equal(ones.materialize(), torch.ones(PAGE))
    pager.stats()  # a call from outside any other: the deferred frees run
    live_host_pages = sum(page.host_slot is not None for allocation in pager._allocations.values() for page in allocation.pages)
    assert pager.host_tier.used_pages == live_host_pages
    assert len(pager._allocations) == 1


def test_a_forward_under_fake_tensor_mode_is_refused_and_leaves_the_cache_as_it_was(nvme_dir):
    """A forward under ``FakeTensorMode`` (shape or memory estimation) on a paged cache holding
    tokens: the cache counted the fake tokens, whose keys and values it never stored (zeros, read
    back by every later forward, silently). It raises naming the way round, the cache unchanged:
    the next real forward gives the unpaged logits."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import DynamicCache

    from pagedtensor import enable_paging
    from pagedtensor.hf import paging_state
    from tests.hf.tiny_models import prompts, tiny_budget, tiny_pair

    reference, model = tiny_pair("llama", attn="sdpa")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=8, host_pages=16), attn_implementation="sdpa")
    ids, _ = prompts(1, length=20)
    cache, dense_cache = paging_state(model).new_cache(model), DynamicCache(config=reference.config)
    with torch.inference_mode():
        model(ids[:, :12], past_key_values=cache)
        reference(ids[:, :12], past_key_values=dense_cache)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_ids = mode.from_tensor(ids[:, 12:])
            with pytest.raises(RuntimeError, match="FakeTensorMode"):
                model(fake_ids, past_key_values=cache)
            with pytest.raises(RuntimeError, match="FakeTensorMode"):
                model(fake_ids, past_key_values=cache, attention_mask=torch.ones(1, 20, dtype=torch.long))
        assert cache.get_seq_length() == 12
        got = model(ids[:, 12:13], past_key_values=cache).logits
        expected = reference(ids[:, 12:13], past_key_values=dense_cache).logits
    assert torch.equal(got, expected)


def test_the_cache_api_used_directly_behaves_as_dynamic_cache(nvme_dir):
    """Calls on the cache itself, outside a paged model's forwards (found by a helper's probe):
    - ``reset()`` kept the last forward's padding: the next fill stored too few tokens a sequence;
    - a batch edit after a padded forward left its pads for a batch they no longer describe;
    - ``batch_select_indices`` / ``batch_repeat_interleave`` of a layer cropped to nothing changed the
      batch, which DynamicCache leaves alone while it holds no token (its next update then failed);
    - ``batch_repeat_interleave`` takes any integer, as DynamicCache does."""
    import numpy as np
    from transformers import DynamicCache

    def check(cache, dense, keys, values):
        got, want = cache.update(keys, values, 0), dense.update(keys, values, 0)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), "the paged cache handed back other states than DynamicCache"

    with _pager(nvme_dir, vram_pages=8, host_pages=16) as pager:
        cache, dense = PagedKVCache(pager=pager, num_layers=1), DynamicCache()
        cache.begin_forward(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), 5)
        cache.update(*_states(2, 5, seed=1), 0)
        cache.reset()
        check(cache, dense, *_states(2, 5, seed=2))

        cache.reset()
        dense = DynamicCache()
        cache.begin_forward(torch.tensor([[0, 1, 1], [1, 1, 1]]), 3)
        cache.update(*_states(2, 3, seed=3), 0)
        cache.batch_select_indices(torch.tensor([1]))
        dense.update(*[state[1:] for state in _states(2, 3, seed=3)], 0)
        check(cache, dense, *_states(1, 2, seed=4))

        for edit in (lambda c: c.batch_select_indices(torch.tensor([1])), lambda c: c.batch_repeat_interleave(2)):
            cache.reset()
            dense = DynamicCache()
            for each in (cache, dense):
                each.update(*_states(2, 3, seed=5), 0)
                each.crop(-3)
                edit(each)
            check(cache, dense, *_states(2, 2, seed=6))

        cache.reset()
        dense = DynamicCache()
        for each in (cache, dense):
            each.update(*_states(2, 3, seed=7), 0)
            each.batch_repeat_interleave(np.int64(2))
        check(cache, dense, *_states(4, 1, seed=8))
        with pytest.raises(ValueError, match=r"repeats must be a positive int, got 0"):
            cache.batch_repeat_interleave(0)
        cache.close()


def test_a_cache_used_directly_under_the_paged_attention_is_freed_when_dropped(nvme_dir):
    """Under a config whose attention is "pagedllm", update() left the cache in ACTIVE_UPDATE for the
    attention that follows it; used directly (no model forward to end), a dropped cache kept its
    pages until the thread's next update. The active update holds the cache weakly."""
    import gc

    with _pager(nvme_dir, vram_pages=8, host_pages=16) as pager:
        config = type("Config", (), {"_attn_implementation": "pagedllm", "num_hidden_layers": 1})()
        cache = PagedKVCache(config, pager=pager)
        keys, values = _states(1, 20, seed=1)
        assert cache.update(keys, values, 0)[0] is keys
        assert ACTIVE_UPDATE.get().cache is cache and ACTIVE_UPDATE.get().key is keys
        del cache
        gc.collect()
        assert pager.stats()["allocations"] == 0
        assert ACTIVE_UPDATE.get() is None or ACTIVE_UPDATE.get().cache is None
    ACTIVE_UPDATE.set(None)


def test_an_update_whose_room_making_runs_out_of_pages_leaves_the_layer_as_it_was():
    """The update's last step makes room for the next streamed pages (evicts to the host); where
    that ran out of pages, after the tokens were written, the layer kept them (lengths 10 to 20):
    a retry would have stored them twice."""
    config = MemoryConfig(vram_limit=2 * PAGE, host_memory=6 * PAGE, page_size=PAGE, device="cpu", slab_size=PAGE)
    cache = PagedKVCache(num_layers=2, memory_config=config)
    keys, values = _states(2, 10, seed=0)
    for layer in range(2):
        cache.update(keys, values, layer)
    more_keys, more_values = _states(2, 10, seed=1)
    cache.update(more_keys, more_values, 0)
    with pytest.raises(OutOfPagesError):
        cache.update(more_keys, more_values, 1)
    assert cache.get_seq_length(1) == 10 and [seq.length for seq in cache.layers[1].seqs] == [10, 10]
    stored_keys, stored_values = cache.dense_kv(1)
    assert torch.equal(stored_keys, keys) and torch.equal(stored_values, values)
    cache.close()


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda cache: cache.crop(-2.5), TypeError, r"crop: .*an int.* got -2\.5"),
        (lambda cache: cache.crop(-2.0), TypeError, r"crop: .*an int.* got -2\.0"),
        (lambda cache: cache.crop(True), TypeError, r"crop: .*an int.* got True"),
        (lambda cache: cache.reorder_cache(torch.tensor([0.7, 1.2, 2.9])), IndexError, r"reorder_cache: beam_idx.*torch\.float32"),
        (lambda cache: cache.reorder_cache(torch.tensor([True, False, True])), IndexError, r"reorder_cache: beam_idx.*torch\.bool"),
        (lambda cache: cache.reorder_cache(torch.tensor([[0, 1], [2, 0]])), IndexError, r"reorder_cache: beam_idx.*shape \(2, 2\)"),
        (lambda cache: cache.batch_select_indices(torch.tensor([0.5, 2.2])), IndexError, r"batch_select_indices: indices.*torch\.float32"),
        (lambda cache: cache.batch_select_indices([0.5, 2.2]), IndexError, r"batch_select_indices: indices.*torch\.float32"),
        (lambda cache: cache.batch_select_indices(torch.tensor([[0], [2]])), IndexError, r"batch_select_indices: indices.*shape \(2, 1\)"),
    ],
)
def test_a_bad_batch_edit_names_its_argument_and_leaves_the_cache_as_it_was(nvme_dir, edit, error, match):
    """A float crop set a sequence's length to 2.5 and then failed (the cache broken for good); float
    positions were truncated ([0.7, 1.2, 2.9] as [0, 1, 2]) and a 2-D index flattened, where
    DynamicCache refuses them."""
    cache = PagedKVCache(pager=_pager(nvme_dir, vram_pages=8), num_layers=1)
    written = _fill(cache, 1, 3, [20])
    with pytest.raises(error, match=match):
        edit(cache)
    assert [seq.length for seq in cache.layers[0].seqs] == [20, 20, 20] and cache.get_seq_length() == 20
    keys, values = cache.dense_kv(0)
    assert torch.equal(keys, written[0][0]) and torch.equal(values, written[0][1])
    cache.crop(-3)  # and it works on
    assert torch.equal(cache.dense_kv(0)[0], written[0][0][:, :, :17])


def test_batch_edits_of_a_closed_cache_say_it_is_closed(nvme_dir):
    """crop of a closed cache on a shared pager raised a bare KeyError of its page references."""
    pager = _pager(nvme_dir, vram_pages=8)
    cache = PagedKVCache(pager=pager, num_layers=1)
    _fill(cache, 1, 2, [20])
    cache.close()
    for edit in (lambda: cache.crop(-10), lambda: cache.reorder_cache(torch.tensor([1, 1])),
                 lambda: cache.batch_repeat_interleave(2), lambda: cache.batch_select_indices(torch.tensor([1]))):  # fmt: skip
        with pytest.raises(RuntimeError, match="this PagedKVCache is closed"):
            edit()


def test_a_closed_cache_resets_to_empty_and_its_reads_say_it_is_closed(nvme_dir):
    """After ``close()``, ``reset()`` raised the pager's "pages [0, 1) of allocation 0 were already
    released" where an update had left its sink and newest pages pinned (close released them, the
    reset again), and ``dense_kv`` raised "allocation 0 is freed" (found by a helper's probe). The
    reset empties the closed cache; a read says the cache is closed."""
    pager = _pager(nvme_dir, vram_pages=8)
    cache = PagedKVCache(pager=pager, num_layers=2)
    keys, values = torch.randn(1, KV_HEADS, 3, HEAD_DIM), torch.randn(1, KV_HEADS, 3, HEAD_DIM)
    for layer in range(2):
        cache.update(keys, values, layer)  # direct use: the hot pages stay pinned
    cache.close()
    with pytest.raises(RuntimeError, match="this PagedKVCache is closed"):
        cache.dense_kv(0)
    cache.reset()
    assert cache.get_seq_length() == 0 and pager.stats()["allocations"] == 0
    with pytest.raises(RuntimeError, match="this PagedKVCache is closed"):
        cache.update(keys, values, 0)


def test_dense_kv_names_a_start_outside_the_layers_positions(nvme_dir):
    """``dense_kv(layer, start)`` took any start: -2 gave two positions of zeros before the first
    token, one past the layer's total raised torch's "Dimension size must be non-negative" (found
    by a helper's probe). A start from 0 to the total is taken; any other is named."""
    cache = PagedKVCache(pager=_pager(nvme_dir), num_layers=1)
    written = _fill(cache, 1, 2, [5])
    for start in range(6):
        keys, values = cache.dense_kv(0, start)
        assert torch.equal(keys, written[0][0][:, :, start:]) and torch.equal(values, written[0][1][:, :, start:])
    for start in (-2, 6):
        with pytest.raises(ValueError, match=rf"dense_kv: start={start} is outside the layer's positions \[0, 5\]"):
            cache.dense_kv(0, start)
    for start in (1.0, True):
        with pytest.raises(TypeError, match=rf"dense_kv: start: expected an int, got {start!r}"):
            cache.dense_kv(0, start)
    cache.close()


def test_an_update_that_runs_out_of_pages_leaves_the_layer_as_it_was():
    """An update that raises part way through the batch (the pager out of pages, no disk tier) is
    all or nothing, as DynamicCache's: the sequences written before the failing one kept their new
    tokens (lengths [96, 16] against a layer total of 16, the stored keys read back as others,
    silently) and the failing one kept its new pages. After it the cache holds what it held, drops
    every page it wrote, and takes the next update."""
    pager = Pager(streaming_config(MemoryConfig(vram_limit=4 * PAGE, host_memory=4 * PAGE, page_size=PAGE, device="cpu",
                                                slab_size=PAGE)))  # fmt: skip
    with pager:
        cache = PagedKVCache(pager=pager, num_layers=1, max_tokens=16)
        keys, values = _states(2, 16, seed=0)
        cache.update(keys, values, 0)
        held = sum(pager.stats()["resident_bytes"].values())
        more_keys, more_values = _states(2, 80, seed=1)  # 5 pages more a sequence: 12 pages, 8 in the tiers
        with pytest.raises(OutOfPagesError):
            cache.update(more_keys, more_values, 0)
        assert [seq.length for seq in cache.layers[0].seqs] == [16, 16] and cache.get_seq_length() == 16
        assert sum(pager.stats()["resident_bytes"].values()) == held  # the new pages' bytes dropped (their segments stay, as after a crop)
        stored_keys, stored_values = cache.dense_kv(0)
        assert torch.equal(stored_keys, keys) and torch.equal(stored_values, values)
        next_keys, next_values = _states(2, 8, seed=2)
        cache.update(next_keys, next_values, 0)
        stored_keys, stored_values = cache.dense_kv(0)
        assert torch.equal(stored_keys, torch.cat([keys, next_keys], dim=2))
        assert torch.equal(stored_values, torch.cat([values, next_values], dim=2))
        cache.close()
