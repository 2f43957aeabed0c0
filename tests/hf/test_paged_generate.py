"""Greedy generation with a paged KV cache equals generation with transformers' default cache.

Five model families, batch 1 and a left-padded batch of 3, budgets of a few pages so that pages go
to host and to disk during the test. With SDPA the cache hands the model dense keys and values read
back from the pages: logits are bitwise equal. With the "pagedllm" attention the Triton kernels
(interpreted on the CPU) read the pages: tokens equal, logits within fp32 tolerance.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from transformers import DynamicCache

from pagedtensor import MemoryConfig, PagedKVCache, PagedTensor, enable_paging
from pagedtensor.hf import paging_state
from tests.hf.tiny_models import FAMILIES, PAGE, TINY, output_cache, prompts, tiny_budget, tiny_pair

NEW_TOKENS = 6


def _generate(model, ids, mask, **kwargs):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **kwargs,
    )


def _assert_spilled(stats: dict) -> None:
    assert stats["bytes_d2h"] > 0, stats
    assert stats["bytes_to_disk"] > 0, stats
    assert stats["bytes_from_disk"] > 0, stats
    assert stats["bytes_h2d"] > 0, stats


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_path_is_bitwise_equal(family, batch, nvme_dir):
    reference, model = tiny_pair(family, attn="sdpa")
    ids, mask = prompts(batch)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa", prefill_chunk_size=16)
    assert model.config._attn_implementation == "sdpa"
    got = _generate(model, ids, mask)
    assert isinstance(output_cache(got), PagedKVCache)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        assert torch.equal(a, b), f"logits differ at step {step}: {(a - b).abs().max()}"
    _assert_spilled(paging_state(model).pager.stats())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pagedllm_attention_matches(family, batch, nvme_dir):
    reference, model = tiny_pair(family, attn="sdpa")
    ids, mask = prompts(batch)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="pagedllm", prefill_chunk_size=16)
    assert model.config._attn_implementation == "pagedllm"
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")
    _assert_spilled(paging_state(model).pager.stats())


@pytest.mark.parametrize("attn", ["sdpa", "pagedllm"])
def test_generate_under_inference_mode_then_outside_it(attn, nvme_dir):
    """The pager's slabs grow during the first generate; grown under torch.inference_mode() they
    must still take writes from a later generate outside it."""
    reference, model = tiny_pair("llama", attn="sdpa")
    ids, mask = prompts(3)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation=attn, prefill_chunk_size=16)
    with torch.inference_mode():
        inside = _generate(model, ids, mask)
    outside = _generate(model, ids, mask)
    assert torch.equal(inside.sequences, expected.sequences)
    assert torch.equal(outside.sequences, expected.sequences)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "pagedllm"])
def test_generate_under_autocast(attn, nvme_dir):
    """Under autocast, Llama's rotary embedding leaves keys in float32 and values in bfloat16: the
    cache keeps both as float32 (exact for the values), and attention casts them as it would."""
    reference, model = tiny_pair("llama", attn="eager" if attn == "eager" else "sdpa")
    ids, mask = prompts(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _generate(reference, ids, mask)
        enable_paging(model, tiny_budget(nvme_dir), attn_implementation=attn, prefill_chunk_size=16)
        got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)


def test_output_attentions_under_the_pagedllm_attention(nvme_dir):
    """The kernels give no attention weights: a call asking for them runs the model's eager attention
    on the pages (it returned none, silently), and its prefill in one piece (in chunks it returned
    one tensor per chunk per layer)."""
    reference, model = tiny_pair("llama", attn="eager")
    ids, mask = prompts(3)
    expected = _generate(reference, ids, mask, output_attentions=True)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="pagedllm", prefill_chunk_size=16)
    _assert_same_generation_with_attentions(_generate(model, ids, mask, output_attentions=True), expected)
    assert torch.equal(_generate(model, ids, mask).sequences, expected.sequences)  # chunked again without them


def _assert_same_generation_with_attentions(got, expected) -> None:
    """The same tokens, and at each step each layer's attention weights (to fp32 tolerance)."""
    assert torch.equal(got.sequences, expected.sequences)
    assert [len(step) for step in got.attentions] == [len(step) for step in expected.attentions]
    for got_step, expected_step in zip(got.attentions, expected.attentions):
        for have, want in zip(got_step, expected_step):
            torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_output_attentions_of_a_model_whose_attention_takes_the_flag_by_name(nvme_dir, use_cache):
    """GPT-2's attention module takes ``output_attentions`` as a parameter of its own and hands the
    attention function none of it (transformers records the weights from the module's output): the
    pagedllm attention returned no weights, silently, with the cache and without. It now asks
    transformers whether the call records attentions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=TINY["vocab_size"], n_positions=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(config).eval()
    model = GPT2LMHeadModel(copy.deepcopy(config)).eval()
    model.load_state_dict(reference.state_dict())
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="pagedllm")
    ids, mask = prompts(1, length=12)
    with torch.no_grad():
        want = reference(ids, output_attentions=True, use_cache=use_cache).attentions
        got = model(ids, output_attentions=True, use_cache=use_cache).attentions
    assert got is not None and len(got) == len(want) == config.n_layer
    for have, expected in zip(got, want):
        torch.testing.assert_close(have, expected, atol=1e-5, rtol=1e-5)
    if use_cache:
        _assert_same_generation_with_attentions(_generate(model, ids, mask, output_attentions=True),
                                                _generate(reference, ids, mask, output_attentions=True))  # fmt: skip


def test_output_router_logits_under_the_pagedllm_attention(nvme_dir):
    """transformers records a mixture of experts' router logits from the router inside each layer:
    a forward asking for them runs its prefill in one piece, as one asking for attentions does (in
    chunks it returned one tensor per layer per chunk, and with a left-padded batch the model's
    auxiliary loss raised a size mismatch). The logits and loss equal the unpaged model's."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    reference = MixtralForCausalLM(config).eval()
    model = MixtralForCausalLM(MixtralConfig.from_dict(config.to_dict())).eval()
    model.load_state_dict(reference.state_dict())
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="pagedllm", prefill_chunk_size=8)
    ids, mask = prompts(3, length=20)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, output_router_logits=True, past_key_values=DynamicCache(config=reference.config))
        got = model(ids, attention_mask=mask, output_router_logits=True, past_key_values=paging_state(model).new_cache(model))
    assert len(got.router_logits) == len(want.router_logits) == config.num_hidden_layers
    for have, expected in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(have, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)


def test_a_training_forward_under_the_pagedllm_attention_gives_the_unpaged_gradients(nvme_dir):
    """A forward with no cache (training, ``use_cache=False``) longer than a prefill chunk: the final
    norm runs whole, as the layers do, so every gradient is the unpaged model's, bit for bit (the
    norm ran in chunks in every long forward under "pagedllm", and its weight's gradient was a sum
    of per-chunk gradients, off by a few ulps)."""
    reference, model = tiny_pair("llama", attn="sdpa")
    with torch.no_grad():
        for parameter in reference.parameters():  # off ones and zeros, so the norm's gradient has rounding to differ in
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())) * 0.05)
    model.load_state_dict(reference.state_dict())
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="pagedllm", prefill_chunk_size=4)
    ids, _ = prompts(2, length=20)
    for each in (reference, model):
        each.train()
        each(ids, labels=ids, use_cache=False).loss.backward()
    for (name, expected), (_, got) in zip(reference.named_parameters(), model.named_parameters()):
        assert torch.equal(got.grad, expected.grad), name


def test_output_attentions_of_sliding_layers_under_the_pagedllm_attention(nvme_dir):
    """A sliding-window layer's weights under ``"pagedllm"`` cover the keys transformers' window
    layer hands the unpaged model, ``[batch, heads, q_len, window - 1 + q_len]`` at a decode step
    (they covered every position, zeros outside the window); and a 4-D mask sized for those keys, as
    the unpaged model takes it, runs (it raised a size mismatch)."""
    reference, model = tiny_pair("mistral", attn="eager", sliding_window=8)
    ids, mask = prompts(1, length=20)
    expected = _generate(reference, ids, mask, output_attentions=True)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="pagedllm")
    got = _generate(model, ids, mask, output_attentions=True)
    assert torch.equal(got.sequences, expected.sequences)
    for got_step, expected_step in zip(got.attentions, expected.attentions):
        for have, want in zip(got_step, expected_step):
            assert have.shape == want.shape
            torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    reference.set_attn_implementation("sdpa")
    window = torch.tril(torch.ones(20, 20, dtype=torch.bool)) & torch.triu(torch.ones(20, 20, dtype=torch.bool), diagonal=-7)
    caches = (DynamicCache(config=reference.config), PagedKVCache(model.config, pager=paging_state(model).pager))
    with torch.no_grad():
        for cache, each in zip(caches, (reference, model)):
            each(ids, attention_mask=window[None, None], cache=cache)
        step = torch.ones(1, 1, 1, 8, dtype=torch.bool)  # the window's keys, as DynamicCache hands them to the layer
        want, have = (each(ids[:, :1], attention_mask=step, cache=cache).logits for cache, each in zip(caches, (reference, model)))
    torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)


def test_eager_attention_dense_path(nvme_dir):
    reference, model = tiny_pair("llama", attn="eager")
    ids, mask = prompts(3)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="eager")
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attn", ["sdpa", "pagedllm"])
def test_sliding_window_outgrown(attn, nvme_dir):
    """Mistral with a window shorter than the context: exact with the dense path, and the pagedllm
    attention falls back to SDPA on the pages with a windowed mask."""
    reference, model = tiny_pair("mistral", attn="sdpa", sliding_window=24)
    ids, mask = prompts(3, length=30)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation=attn, prefill_chunk_size=16)
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _sliding_pair(family: str, dtype: torch.dtype, attn: str):
    """A tiny model with a window of 8 on every layer (Mistral) or on every other one (Gemma 3, its
    layer types alternating sliding and full), and its copy, in ``dtype``."""
    if family == "mistral":
        reference, model = tiny_pair("mistral", attn=attn, sliding_window=8)
    else:
        import copy

        import transformers

        from tests.hf.tiny_models import TINY

        config = transformers.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        config._attn_implementation = attn
        torch.manual_seed(0)
        reference = transformers.Gemma3ForCausalLM(config).eval()
        model = transformers.Gemma3ForCausalLM(copy.deepcopy(config)).eval()
        model.load_state_dict(reference.state_dict())
    return reference.to(dtype), model.to(dtype)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_sliding_window_outgrown_under_a_dense_attention_is_bitwise_unpaged(family, dtype, attn, nvme_dir):
    """Under a dense attention a sliding-window layer is handed the keys transformers' window layer
    hands it (the last window - 1 before the new ones) with the mask sized alike, so the logits are
    the unpaged model's bits, in bf16 too. (The cache handed every key with the window as a mask:
    in bf16 SDPA over the longer key set rounded otherwise, and Gemma 3's greedy tokens diverged.)"""
    reference, model = _sliding_pair(family, dtype, attn)
    ids, mask = prompts(3, length=20)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation=attn)
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        assert torch.equal(a, b)
    assert output_cache(got).is_sliding == ([True, True] if family == "mistral" else [True, False])


@pytest.mark.parametrize("batch", [1, 3])
def test_large_budget_keeps_everything_on_device(batch, nvme_dir):
    """With room for every page, nothing leaves the device tier and the kernels read one slab
    (one causal call per prefill chunk, pads included; one decode call per step)."""
    reference, model = tiny_pair("qwen2")
    ids, mask = prompts(batch, length=30)
    expected = _generate(reference, ids, mask)
    budget = MemoryConfig(vram_limit=64 * PAGE, host_memory=4 * PAGE, page_size=PAGE, nvme_path=nvme_dir, device="cpu", slab_size=64 * PAGE)
    enable_paging(model, budget, attn_implementation="pagedllm", prefill_chunk_size=16)
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    stats = paging_state(model).pager.stats()
    assert stats["bytes_d2h"] == 0 and stats["bytes_h2d"] == 0, stats
    cache = output_cache(got)
    # the sink and newest pages were pinned while generating; the cache handed back holds no pins
    # (a kept cache would hold device slots later generates need), and its pages stay on the device
    pages = [cache.page_count(seq.length) for layer in cache.layers for seq in layer.seqs]
    assert cache.stats()["hot_pins"] == 0
    assert cache.stats()["kv_pages"]["device"] == sum(pages)


def test_chunked_prefill_runs_layers_in_chunks(nvme_dir):
    reference, model = tiny_pair("llama")
    calls: list[int] = []
    layer = model.model.layers[0]
    inner = layer.forward

    def counting(hidden_states, *args, **kwargs):
        calls.append(hidden_states.shape[1])
        return inner(hidden_states, *args, **kwargs)

    layer.forward = counting
    ids, mask = prompts(1, length=40)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=8), attn_implementation="pagedllm", prefill_chunk_size=16)
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    assert calls[:3] == [16, 16, 8], calls  # the 40-token prompt, in chunks
    assert calls[3:] == [1] * (NEW_TOKENS - 1)


@pytest.mark.parametrize("attn", ["sdpa", "pagedllm"])
@pytest.mark.parametrize("draft", ["assistant", "paged assistant", "prompt lookup"])
def test_assisted_decoding_runs_on_the_paged_cache_cropped_past_rejected_tokens(draft, attn, nvme_dir, tmp_path, monkeypatch):
    """Assisted decoding (a draft model, paged or not, or prompt lookup): the model checks each
    draft's tokens in one forward on its paged cache, and transformers crops the cache back past the
    rejected ones. Tokens equal to transformers' own cache's, logits bitwise (SDPA) or within fp32
    tolerance (the kernels); the paged cache was cropped (and so was the paged draft model's own), and pages went to host and disk."""
    reference, model = tiny_pair("llama")
    draft_reference, draft_model = tiny_pair("llama", seed=5, num_hidden_layers=1)
    ids, mask = prompts(1, length=30)
    extra = {"prompt_lookup_num_tokens": 3} if draft == "prompt lookup" else {"assistant_model": draft_reference}
    expected = _generate(reference, ids, mask, **extra)
    cropped: list[int] = []  # the ids of the paged caches cropped
    crop = PagedKVCache.crop

    def counting_crop(cache: PagedKVCache, tokens: int) -> None:
        cropped.append(id(cache))
        crop(cache, tokens)

    monkeypatch.setattr(PagedKVCache, "crop", counting_crop)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation=attn, prefill_chunk_size=16)
    if draft == "paged assistant":
        enable_paging(draft_model, tiny_budget(str(tmp_path / "draft")), attn_implementation=attn, prefill_chunk_size=16)
        extra = {"assistant_model": draft_model}
    got = _generate(model, ids, mask, **extra)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        if attn == "sdpa":  # the cache hands SDPA dense keys and values: bitwise; the kernels: fp32 tolerance
            assert torch.equal(a, b), f"step {step}: {(a - b).abs().max()}"
        else:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")
    cache = output_cache(got)
    assert isinstance(cache, PagedKVCache) and id(cache) in cropped
    assert len(set(cropped)) == (2 if draft == "paged assistant" else 1)  # the draft model's own paged cache
    _assert_spilled(paging_state(model).pager.stats())


@pytest.mark.parametrize("attn", ["sdpa", "pagedllm"])
def test_assisted_decoding_with_a_sliding_window_outgrown(attn, nvme_dir):
    """A draft's rejected tokens cropped from a model whose window the context outgrows: the paged
    cache keeps every token and masks the window, so the crop loses none the next forward needs
    (transformers' own cache keeps the window's tokens and a record of the past to roll back to)."""
    reference, model = tiny_pair("mistral", sliding_window=12)
    draft_reference, _ = tiny_pair("mistral", seed=5, sliding_window=12, num_hidden_layers=1)
    ids, mask = prompts(1, length=30)
    expected = _generate(reference, ids, mask, assistant_model=draft_reference)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation=attn, prefill_chunk_size=16)
    got = _generate(model, ids, mask, assistant_model=draft_reference)
    assert isinstance(output_cache(got), PagedKVCache)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "pagedllm"])
def test_a_compiled_forward_runs_the_paged_cache_eagerly_with_the_same_tokens(attn, nvme_dir, monkeypatch):
    """``model.forward = torch.compile(model.forward)`` under ``enable_paging``: the unpaged tokens, and
    ``PagedKVCache.update`` and the ``"pagedllm"`` attention run eagerly, a graph break each, never
    traced. Dynamo traced into them before, breaking at their logging, locks and page lookups (23
    breaks for 12 tokens of this model where there are now 18, all at those two)."""
    import pagedtensor.hf.attention as attention_module
    from pagedtensor.hf.cache import PagedKVCache as Cache

    compiling: list[bool] = []
    write_tokens, paged_attention = Cache._write_tokens, attention_module.paged_attention

    def noted_write_tokens(self, *args, **kwargs):
        compiling.append(torch.compiler.is_compiling())
        return write_tokens(self, *args, **kwargs)

    def noted_paged_attention(*args, **kwargs):
        compiling.append(torch.compiler.is_compiling())
        return paged_attention(*args, **kwargs)

    monkeypatch.setattr(Cache, "_write_tokens", noted_write_tokens)
    monkeypatch.setattr(attention_module, "paged_attention", noted_paged_attention)
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), attn_implementation=attn)
    assert torch.equal(_compiled_generate(model, ids, mask), expected)
    assert compiling and not any(compiling)


def test_a_compiled_model_whose_forward_is_compiled_gives_the_unpaged_logits(nvme_dir):
    """``torch.compile(model)`` of a paged model whose forward is already compiled: Dynamo, tracing the
    paging pre-hook, failed reading the compiled forward's signature (``'method' object has no
    attribute '__dict__'``) for a forward called with positional arguments; the plain model runs."""
    reference, model = tiny_pair("llama")
    ids, mask = prompts(2)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), attn_implementation="sdpa")
    with torch.no_grad():
        reference.forward = torch.compile(reference.forward, backend="eager")
        model.forward = torch.compile(model.forward, backend="eager")
        expected = torch.compile(reference, backend="eager")(ids, mask).logits
        got = torch.compile(model, backend="eager")(ids, mask).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("attn", ["sdpa", "pagedllm"])
def test_a_compiled_forward_compiles_the_attention_of_every_layer(attn, nvme_dir, caplog):
    """Each layer's attention compiles its own entries: transformers hands the cache update (run
    eagerly, a graph break) its ``layer_idx``, an int that Dynamo specializes, so the attention's code
    takes two entries a layer. Past four layers torch's default ``recompile_limit`` of 8 was hit
    (torch's warning), and the attention of every later layer ran uncompiled; a paged cache raises
    the limit to what its layers need. The frames of the functions that run eagerly (the cache's
    update among them) are skipped, not compiled into graphs of nothing."""
    import torch._dynamo

    reference, model = tiny_pair("llama", num_hidden_layers=6)
    ids, mask = prompts(1)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=64, host_pages=64), attn_implementation=attn)
    with torch._dynamo.config.patch(recompile_limit=8), caplog.at_level(logging.WARNING):  # torch's default, put back after
        assert torch.equal(_compiled_generate(model, ids, mask), expected)
        assert torch._dynamo.config.recompile_limit >= 2 * 6
    hit = [record.getMessage() for record in caplog.records if "recompile_limit" in record.getMessage()]
    assert not hit, hit


def _compiled_generate(model, ids, mask) -> torch.Tensor:
    """Greedy tokens of ``model`` with its forward compiled (``backend="eager"``), Dynamo reset before and after."""
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager")
    try:
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("attn", ["sdpa", "pagedllm"])
def test_a_compiled_forward_keeps_paged_weights_paged(attn, nvme_dir):
    """Under ``page_weights=True`` a compiled forward traced the layers' prefetch hooks and paged
    linears, so every paged weight entered the graph, where torch.compile reads a PagedTensor as its
    materialized copy: after generate the whole model was held dense (2.4 MB of copies under a
    160 KiB device tier, found by a helper's probe), outside the pager's budgets. The hooks and the
    paged linears run eagerly, as the cache's update and the paged attention do: no weight is
    materialized, and the tokens are the unpaged model's."""
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=40, host_pages=256), attn_implementation=attn, page_weights=True)
    weights = [p for p in model.parameters() if isinstance(p, PagedTensor)]
    assert weights
    assert torch.equal(_compiled_generate(model, ids, mask), expected)
    held = [p for p in weights if p._materialized is not None]
    assert not held, f"{len(held)} of {len(weights)} paged weights held as dense copies"


def test_the_paged_attention_without_a_paged_cache_masks_the_models_eager_attention(nvme_dir):
    """Under ``"pagedllm"``, a forward with no paged cache behind it (``use_cache=False``, a static
    cache) that needs the model's eager attention (``output_attentions=True``; Gemma 2's soft-capping)
    got transformers' SDPA mask, which leaves a causal mask out (None, for SDPA's ``is_causal``):
    the eager attention then saw later tokens (logits 0.5 apart, weights above the diagonal; found by
    a helper's probe). It gets SDPA's causal mask, top-left aligned, and the unpaged results."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    reference, model = tiny_pair("llama", attn="eager")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=8, host_pages=8), attn_implementation="pagedllm")
    ids, _ = prompts(1, length=20)
    with torch.no_grad():
        got, expected = model(ids, use_cache=False, output_attentions=True), reference(ids, use_cache=False, output_attentions=True)
    assert torch.equal(got.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.attentions, expected.attentions))

    config = Gemma2Config(**{**TINY, "head_dim": 16, "sliding_window": 64})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = Gemma2ForCausalLM(config).eval()
    model = Gemma2ForCausalLM(copy.deepcopy(config)).eval()
    model.load_state_dict(reference.state_dict())
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=8, host_pages=8), attn_implementation="pagedllm")
    settings = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
    for extra in ({"use_cache": False}, {"cache_implementation": "static"}):
        got, expected = model.generate(ids, **settings, **extra), reference.generate(ids, **settings, **extra)
        assert torch.equal(got.sequences, expected.sequences), extra
        assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores)), extra
