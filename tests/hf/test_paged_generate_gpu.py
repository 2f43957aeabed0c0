"""Paged generation on a real CUDA device: compiled Triton kernels, side streams, pinned host slabs.

Every copy is asynchronous here, so a missing wait, a slot reused before the kernel reading it
finished, or a block table overwritten too early shows up as wrong tokens. Budgets are small so
most pages stream in from host (and disk) at every step.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from pagedtensor import MemoryConfig, enable_paging
from pagedtensor.hf import PagedModel, paging_state
from pagedtensor.tensor import PagedTensor

pytestmark = pytest.mark.gpu

PAGE = 64 * 2**10


def _pair(dtype: torch.dtype, seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=layers, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024,
        vocab_size=1024, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    reference = LlamaForCausalLM(config).to("cuda", dtype).eval()
    model = LlamaForCausalLM(copy.deepcopy(config)).to("cuda", dtype).eval()
    model.load_state_dict(reference.state_dict())
    return reference, model


def _reference_and_copy(model_class, config, seed: int):
    """A random ``model_class`` under SDPA on CUDA (fp32) and a deep copy of it to page."""
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    reference = model_class(config).to("cuda").eval()
    return reference, copy.deepcopy(reference)


def _prompts(batch: int, length: int):
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 1024, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch == 3:
        mask[1, :100] = 0
        mask[2, : length - 37] = 0
        ids[mask == 0] = 0
    return ids.cuda(), mask.cuda()


def _budget(nvme_dir: str, vram_pages: int, host_pages: int = 4096, slab_pages: int = 4096) -> MemoryConfig:
    return MemoryConfig(
        vram_limit=vram_pages * PAGE, host_memory=host_pages * PAGE, page_size=PAGE, nvme_path=nvme_dir,
        device="cuda", slab_size=slab_pages * PAGE, prefetch_strategy="none",
    )


def _generate(model, ids, mask, new_tokens):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_streamed_pages_fp32(batch, nvme_dir):
    """fp32 (exact dots): tokens equal SDPA's; 1500-token prompts, ~1/8 of the pages resident."""
    reference, model = _pair(torch.float32)
    ids, mask = _prompts(batch, 1500)
    expected = _generate(reference, ids, mask, 24)
    # K+V of one token per layer: 2 x 4 heads x 64 x 4 B = 2 KiB: 32 tokens a page, 47 pages per layer and sequence
    enable_paging(model, _budget(nvme_dir, vram_pages=24 * batch, slab_pages=8), attn_implementation="pagedllm",
                  prefill_chunk_size=256, stream_group_bytes=4 * PAGE)
    got = _generate(model, ids, mask, 24)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    stats = paging_state(model).pager.stats()
    assert stats["bytes_h2d"] > 10 * stats["device_slab_bytes"], stats


def test_gpu_fp16_disk_tier(nvme_dir):
    """fp16 through all three tiers, teacher-forced on the reference's tokens (different kernels may
    break a near tie differently in fp16): every step's logits within fp16 tolerance."""
    from pagedtensor.hf.model import cache_keyword

    reference, model = _pair(torch.float16, seed=1)
    ids, mask = _prompts(1, 900)
    expected = _generate(reference, ids, mask, 12)
    enable_paging(model, _budget(nvme_dir, vram_pages=16, host_pages=48, slab_pages=16), attn_implementation="pagedllm",
                  prefill_chunk_size=128)
    cache = paging_state(model).new_cache(model)
    keyword = {cache_keyword(model): cache}
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **keyword).logits[:, -1]
        torch.testing.assert_close(logits.float(), expected.logits[0].float(), atol=3e-2, rtol=3e-2)
        for step in range(1, 12):
            token = expected.sequences[:, ids.shape[1] + step - 1 : ids.shape[1] + step]
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits = model(token, attention_mask=mask, use_cache=True, **keyword).logits[:, -1]
            torch.testing.assert_close(logits.float(), expected.logits[step].float(), atol=3e-2, rtol=3e-2)
    cache.close()
    stats = paging_state(model).pager.stats()
    assert stats["bytes_to_disk"] > 0 and stats["bytes_from_disk"] > 0, stats


@pytest.mark.parametrize("global_head_dim", [64, 512])
def test_gpu_layers_of_other_head_sizes_stream_their_own_pages(global_head_dim, nvme_dir):
    """Gemma 4's layout on CUDA in fp32: sliding layers of 2 KV heads x 128, full-attention layers of one
    KV head (attention_k_eq_v) x ``global_head_dim``, so the two kinds of layer have pages of 32 tokens
    and of 128 or 16; 64 runs the kernels on both, 512 (Gemma 4's own) the dense attention on the full
    layers' pages. Pages stream in at every step: the unpaged tokens. Logits to 1e-3: Gemma 4 scales
    scores by 1 after normalizing queries and keys, so a score reaches the head size and the order of
    fp32 additions shows more than in Llama's (5.1e-5 and 1.6e-4 measured on the H200, logits up to 2.5;
    3.0e-4 with 256-wide sliding heads over 1200 tokens)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip("transformers before Gemma 4")
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        num_hidden_layers=4, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=1024,
        vocab_size=1024, vocab_size_per_layer_input=1024, hidden_size_per_layer_input=16, max_position_embeddings=4096,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=4096, global_head_dim=global_head_dim,
        attention_k_eq_v=True, num_global_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )  # fmt: skip
    reference, model = _reference_and_copy(Gemma4ForCausalLM, config, seed=4)
    ids, mask = _prompts(3, 800)
    expected = _generate(reference, ids, mask, 12)
    enable_paging(model, _budget(nvme_dir, vram_pages=48, slab_pages=16), attn_implementation="pagedllm",
                  prefill_chunk_size=256, stream_group_bytes=8 * PAGE)  # fmt: skip
    got = _generate(model, ids, mask, 12)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    tokens = [layer.geometry.page_tokens for layer in got.past_key_values.layers]
    assert tokens == [32, PAGE // (2 * global_head_dim * 4)] * 2, tokens
    stats = paging_state(model).pager.stats()
    assert stats["bytes_h2d"] > 10 * stats["device_slab_bytes"], stats


def test_gpu_latent_attention_streams_keys_and_values_of_two_sizes(nvme_dir):
    """DeepSeek V3's multi-head latent attention on CUDA in fp32: the cache holds its latent (512 wide)
    as keys and its rotary part (64) as values, pages of 28 tokens, streamed in at every step under
    "auto" (the model's own SDPA over the dense states): the unpaged tokens and logits bit for bit."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(
        num_hidden_layers=3, hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1024,
        moe_intermediate_size=256, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
        kv_lora_rank=512, q_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, vocab_size=1024,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )  # fmt: skip
    reference, model = _reference_and_copy(transformers.DeepseekV3ForCausalLM, config, seed=6)
    ids, mask = _prompts(3, 600)
    expected = _generate(reference, ids, mask, 10)
    enable_paging(model, _budget(nvme_dir, vram_pages=24, slab_pages=8), prefill_chunk_size=128, stream_group_bytes=4 * PAGE)
    assert model.config._attn_implementation == "sdpa"
    got = _generate(model, ids, mask, 10)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        assert torch.equal(a, b), f"step {step}"
    geometries = {(g.kv_heads, g.head_dim, g.value_dim, g.page_tokens) for g in (layer.geometry for layer in got.past_key_values.layers)}
    assert geometries == {(1, 512, 64, PAGE // ((512 + 64) * 4))}, geometries
    stats = paging_state(model).pager.stats()
    assert stats["bytes_h2d"] > 0 and stats["bytes_d2h"] > 0, stats


def test_gpu_paged_weights_stream_every_token(nvme_dir):
    """page_weights=True on CUDA: decoder weights (~38 MB) and KV share a 6 MiB device budget, so the
    weights stream in from pinned host memory every token, on the H2D stream beside the compute."""
    reference, model = _pair(torch.float32, seed=3)
    ids, mask = _prompts(1, 600)
    expected = _generate(reference, ids, mask, 8)
    layer_bytes = sum(p.numel() * p.element_size() for layer in model.model.layers for p in layer.parameters())
    enable_paging(model, _budget(nvme_dir, vram_pages=96, slab_pages=96), attn_implementation="pagedllm",
                  prefill_chunk_size=256, page_weights=True)
    got = _generate(model, ids, mask, 8)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    stats = paging_state(model).pager.stats()
    assert stats["bytes_h2d"] > 4 * layer_bytes, (stats, layer_bytes)
    # A layer (9.4 MB) is more than the tier holds: nothing of the next fits beside the one about to
    # run, so the layer-ahead hook prefetches nothing (what it prefetched was evicted before use).
    assert stats["prefetched_pages"] == 0, stats


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
def test_gpu_mixture_of_experts_pages_by_expert(experts_implementation, nvme_dir):
    """A bf16 Mixtral shape (8 experts, top 2; 96 MiB of expert stacks, 16 MiB each for a layer's
    gate and up projections) under a 10 MiB device tier: torch's CUTLASS grouped GEMM on the
    routed experts' copies gives the bits of the whole stack's, token after token."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        num_hidden_layers=4, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=1024, max_position_embeddings=4096, sliding_window=None,
        pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(4)
    reference = MixtralForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model = MixtralForCausalLM(copy.deepcopy(config)).to("cuda", torch.bfloat16).eval()
    model.load_state_dict(reference.state_dict())
    for each in (reference, model):
        each.set_experts_implementation(experts_implementation)
    ids, mask = _prompts(1, 300)
    expected = _generate(reference, ids, mask, 8)
    enable_paging(model, _budget(nvme_dir, vram_pages=160, slab_pages=160), attn_implementation="sdpa",
                  prefill_chunk_size=128, page_weights=True)
    got = _generate(model, ids, mask, 8)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        assert torch.equal(a, b)
    stats = paging_state(model).pager.stats()
    stacks = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in name)
    # Every expert at each of a layer's 3 prefill chunks and 7 decode steps would move 10x the
    # stacks (none fits the tier); the same run on a CPU pager moves 3.2x.
    assert 0 < stats["bytes_h2d"] < 6 * stacks, (stats["bytes_h2d"], stacks)


@pytest.mark.parametrize("family", ["gpt2", "falcon"])
def test_gpu_paged_weights_of_gpt2_and_falcon(family, nvme_dir):
    """page_weights=True on CUDA for layers whose attention is not named ``self_attn``: GPT-2's
    ``Conv1D`` (``paged_conv1d``) and Falcon's ``FalconLinear`` read their weights from pinned pages
    streamed in every token; tokens and fp32 logits as unpaged."""
    import transformers

    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=4, n_embd=512, n_head=8, n_positions=2048, vocab_size=1024,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=None)  # fmt: skip
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.FalconConfig(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, new_decoder_architecture=True,
                                           num_kv_heads=4, vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=None)  # fmt: skip
        cls = transformers.FalconForCausalLM
    reference, model = _reference_and_copy(cls, config, seed=6)
    ids, mask = _prompts(1, 400)
    expected = _generate(reference, ids, mask, 8)
    # 4 MiB MLP weights, ~50 MB of layers, a 10 MiB device tier
    enable_paging(model, _budget(nvme_dir, vram_pages=160, slab_pages=160), attn_implementation="sdpa",
                  prefill_chunk_size=128, page_weights=True)
    state = paging_state(model)
    assert len(state.paged_layers) == 4
    assert all(any(isinstance(p, PagedTensor) for p in layer.parameters()) for layer in state.paged_layers)
    got = _generate(model, ids, mask, 8)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    layer_bytes = sum(p.numel() * p.element_size() for layer in state.paged_layers for p in layer.parameters())
    assert state.pager.stats()["bytes_h2d"] > 4 * layer_bytes, (state.pager.stats(), layer_bytes)


def test_gpu_beam_search_on_a_callers_paged_cache(nvme_dir):
    """Beam search given a PagedKVCache on CUDA with the paged attention kernels: beams kept twice
    share their pages (copy-on-write); sequences as with transformers' own cache."""
    from pagedtensor.hf import PagedKVCache
    from pagedtensor.hf.model import cache_keyword

    reference, model = _pair(torch.float32, seed=8, layers=2)
    ids, mask = _prompts(1, 300)
    settings = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    expected = reference.generate(ids, **settings)
    enable_paging(model, _budget(nvme_dir, vram_pages=48, slab_pages=16), attn_implementation="pagedllm", prefill_chunk_size=128)
    cache = PagedKVCache(model.config, pager=paging_state(model).pager)
    got = model.generate(ids, **settings, **{cache_keyword(model): cache})
    assert torch.equal(got, expected)
    cache.close()


def test_gpu_two_models_on_one_pager_generate_from_two_threads(nvme_dir):
    """Two models paged on one pager, generating at once from two threads, each on its own CUDA
    stream: the threads' pages compete for one device budget; each gets its unpaged tokens."""
    from pagedtensor import Pager
    from tests.support import run_in_threads

    pairs = [_pair(torch.float32, seed=seed, layers=2) for seed in (4, 5)]
    ids, mask = _prompts(3, 700)
    expected = [_generate(reference, ids, mask, 12).sequences for reference, _ in pairs]
    pager = Pager(_budget(nvme_dir, vram_pages=64, slab_pages=16))
    for _, model in pairs:
        enable_paging(model, pager=pager, attn_implementation="pagedllm", prefill_chunk_size=256, stream_group_bytes=4 * PAGE)
    got: list = [None, None]

    def worker(index: int) -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            got[index] = _generate(pairs[index][1], ids, mask, 12).sequences
        torch.cuda.current_stream().synchronize()

    for _ in range(2):
        assert run_in_threads(worker, 2) == []
        torch.cuda.synchronize()
        for index in range(2):
            assert torch.equal(got[index], expected[index]), index
    stats = pager.stats()
    assert stats["bytes_h2d"] > 0 and stats["bytes_d2h"] > 0, stats
    pager.close()


def test_gpu_threads_generating_at_once_with_paged_weights_wait_for_each_others_pins(nvme_dir):
    """Three threads, each on its own CUDA stream, generate at once with one model whose weights are
    paged under a device tier of a little more than two of its largest weights (2 MiB each): an op
    whose weight finds the tier full of other threads' pins waits for them (it raised
    DeviceTierFullError), and every generate returns the unpaged tokens."""
    from tests.support import run_in_threads

    reference, model = _pair(torch.float32, seed=6)
    ids, mask = _prompts(1, 200)
    expected = _generate(reference, ids, mask, 6).sequences
    largest = max(p.numel() * p.element_size() for p in model.model.layers.parameters()) // PAGE
    vram_pages = 2 * largest + 8
    enable_paging(model, _budget(nvme_dir, vram_pages=vram_pages, slab_pages=vram_pages), attn_implementation="sdpa", page_weights=True)
    barrier = threading.Barrier(3)

    def worker(index: int) -> None:
        barrier.wait(timeout=60)
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(2):
                got = _generate(model, ids, mask, 6).sequences
                torch.cuda.current_stream().synchronize()
                assert torch.equal(got, expected), index

    assert run_in_threads(worker, 3) == []


def test_gpu_everything_resident_moves_nothing(nvme_dir):
    reference, model = _pair(torch.float32, seed=2)
    ids, mask = _prompts(1, 700)
    expected = _generate(reference, ids, mask, 16)
    paged = PagedModel(model, _budget(nvme_dir, vram_pages=512, slab_pages=512), attn_implementation="pagedllm", prefill_chunk_size=256)
    result = paged.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, measure_memory=True)
    assert torch.equal(result.sequences, expected.sequences)
    assert result.paging["decode"]["bytes_h2d"] == 0 and result.paging["prefill"]["bytes_d2h"] == 0
    assert result.peak_memory_gb is not None and result.peak_memory_gb > 0
    assert isinstance(result.allocator_retries, int) and result.allocator_retries >= 0
    assert result.tokens_per_second > 0 and result.time_to_first_token_s > 0


def test_gpu_long_context_bench_smoke(tmp_path):
    """The benchmark's code path end to end on a small shape (2 layers, 8K tokens)."""
    import json

    from benchmarks import bench_long_context

    out = tmp_path / "long_context.json"
    code = bench_long_context.main([
        "--layers", "2", "--contexts", "8192", "--new-tokens", "8", "--offload-new-tokens", "2", "--cap-gib", "6",
        "--kv-vram-gib", "0.05", "--host-gib", "2", "--runs", "paged,native", "--out", str(out), "--timeout", "300",
    ])
    assert code == 0
    results = json.loads(out.read_text())
    paged = next(r for r in results["runs"] if r["run"] == "paged")
    assert paged["status"] == "ok", paged
    assert paged["bytes_h2d_per_token"] > 0
    assert "tokens_matching_prefix" in results["verdicts"]["8192"]
    for run in results["runs"]:
        timeline = run["prefill_timeline"]
        assert timeline["complete"] and timeline["layers"] == 2, timeline
        assert timeline["total_gpu_ms"] > 0 and all(ms > 0 for ms in timeline["layer_gpu_ms"]), timeline


def test_gpu_beam_search_under_enable_paging_shares_pages(nvme_dir):
    """Beam search with no cache of the caller's: enable_paging gives it a PagedKVCache whose beams
    share pages copy-on-write; on CUDA with the paged attention kernels, sequences as with
    transformers' own cache, and nothing left allocated once the cache is closed."""
    from pagedtensor.hf import PagedKVCache
    from tests.hf.tiny_models import output_cache

    reference, model = _pair(torch.float32, seed=9, layers=2)
    ids, mask = _prompts(2, 300)
    settings = dict(attention_mask=mask, max_new_tokens=6, num_beams=4, num_return_sequences=2, do_sample=False,
                    return_dict_in_generate=True)  # fmt: skip
    expected = reference.generate(ids, **settings)
    enable_paging(model, _budget(nvme_dir, vram_pages=48, slab_pages=16), attn_implementation="pagedllm", prefill_chunk_size=128)
    got = model.generate(ids, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    cache = output_cache(got)
    assert isinstance(cache, PagedKVCache)
    assert cache.stats()["kv_pages_copied"] > 0
    cache.close()
    assert paging_state(model).pager.stats()["allocations"] == 0


@pytest.mark.parametrize("draft", ["assistant", "prompt lookup"])
def test_gpu_assisted_decoding_streams_the_paged_cache_and_crops_it(draft, nvme_dir):
    """Assisted decoding under enable_paging on CUDA: each draft is checked in one forward by the
    paged prefill kernel over streamed pages, and transformers crops the paged cache past the
    rejected tokens; sequences as with transformers' own cache, logits within fp32 tolerance."""
    from pagedtensor.hf import PagedKVCache
    from tests.hf.tiny_models import output_cache

    reference, model = _pair(torch.float32, seed=3, layers=2)
    draft_model, _ = _pair(torch.float32, seed=4, layers=1)
    ids, mask = _prompts(1, 700)
    extra = {"assistant_model": draft_model} if draft == "assistant" else {"prompt_lookup_num_tokens": 4}
    settings = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = reference.generate(ids, **settings, **extra)
    enable_paging(model, _budget(nvme_dir, vram_pages=12, slab_pages=8), attn_implementation="pagedllm", prefill_chunk_size=256,
                  stream_group_bytes=4 * PAGE)  # fmt: skip
    got = model.generate(ids, **settings, **extra)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    assert isinstance(output_cache(got), PagedKVCache)
    stats = paging_state(model).pager.stats()
    assert stats["bytes_h2d"] > 4 * stats["device_slab_bytes"], stats


def test_gpu_a_device_map_of_the_gpu_loads_and_one_offloading_to_the_cpu_is_refused(nvme_dir, tmp_path):
    """``device_map="cuda"`` loads onto the GPU without accelerate's hooks: paged, the same tokens.
    A device map placing some layers on the CPU (as ``device_map="auto"`` does for a model larger
    than the GPU) dispatches it under accelerate's hooks: refused, naming device_map and
    page_weights=True."""
    reference, _ = _pair(torch.float32, seed=3, layers=2)
    reference.cpu().save_pretrained(tmp_path / "tiny")
    reference.cuda()
    ids, mask = _prompts(1, 300)
    expected = _generate(reference, ids, mask, 6)
    paged = PagedModel.from_pretrained(str(tmp_path / "tiny"), _budget(nvme_dir, vram_pages=64, slab_pages=16), load_tokenizer=False,
                                       device_map="cuda", paging={"attn_implementation": "pagedllm"})  # fmt: skip
    assert torch.equal(_generate(paged, ids, mask, 6).sequences, expected.sequences)
    with pytest.raises(ValueError, match=r"accelerate dispatched the model \(device_map placing it on .*cpu.*page_weights=True"):
        PagedModel.from_pretrained(str(tmp_path / "tiny"), _budget(nvme_dir, vram_pages=64), load_tokenizer=False,
                                   device_map={"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "cpu",
                                               "model.rotary_emb": "cpu", "lm_head": "cpu"})  # fmt: skip


def test_gpu_a_model_on_the_cpu_pages_its_weights_from_there_and_moves_only_the_rest(nvme_dir, tmp_path):
    """A model larger than the GPU is loaded on the CPU: with page_weights=True, enable_paging pages
    each decoder-layer weight from there (into device pages that spill to pinned host memory) and
    moves only what stays dense (embeddings, norms, lm_head, buffers), so the GPU never holds the
    layers' weights whole; the tokens and logits are those of the same model run on the GPU.
    ``PagedModel.from_pretrained(..., paging={"page_weights": True})`` loads so."""
    from transformers import LlamaForCausalLM

    reference, _ = _pair(torch.float32, seed=3)
    reference.cpu().save_pretrained(tmp_path / "tiny")
    reference.cuda()
    ids, mask = _prompts(1, 600)
    expected = _generate(reference, ids, mask, 8)
    layer_bytes = sum(p.numel() * p.element_size() for layer in reference.model.layers for p in layer.parameters())
    dense_bytes = sum(p.numel() * p.element_size() for p in reference.parameters()) - layer_bytes
    budget = 96 * PAGE  # 6 MiB of ~38 MB of layer weights
    for load in ("enable_paging", "from_pretrained"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        if load == "enable_paging":
            model = LlamaForCausalLM.from_pretrained(tmp_path / "tiny").eval()
            model.config._attn_implementation = "sdpa"
            assert all(p.device.type == "cpu" for p in model.parameters())
            enable_paging(model, _budget(nvme_dir, vram_pages=96, slab_pages=96), attn_implementation="pagedllm",
                          prefill_chunk_size=256, page_weights=True)
        else:
            model = PagedModel.from_pretrained(str(tmp_path / "tiny"), _budget(nvme_dir, vram_pages=96, slab_pages=96), load_tokenizer=False,
                                               paging={"page_weights": True, "attn_implementation": "pagedllm", "prefill_chunk_size": 256})  # fmt: skip
        torch.cuda.synchronize()
        loading_peak = torch.cuda.max_memory_allocated() - start
        assert loading_peak < budget + dense_bytes + layer_bytes // 4, (load, loading_peak, budget, dense_bytes, layer_bytes)
        assert all(p.is_cuda for p in model.parameters()) and all(b.is_cuda for b in model.buffers()), load
        assert any(isinstance(p, PagedTensor) for p in model.parameters()), load
        got = _generate(model, ids, mask, 8)
        assert torch.equal(got.sequences, expected.sequences), load
        for a, b in zip(got.logits, expected.logits):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
        paging_state(model.model if load == "from_pretrained" else model).pager.close()
        del model


def test_gpu_what_stays_dense_moves_in_place_to_the_gpu_and_back_if_a_move_fails(nvme_dir):
    """Between the CPU and a GPU each dense parameter takes its moved data in place, as
    ``model.to`` does: the same parameter objects, ties kept, gradients moved; where a tensor cannot
    move, the ones moved before it come back to their CPU data."""
    from pagedtensor import Pager
    from tests.hf.test_weight_paging import move_dense_tensors_after_a_failed_move
    from tests.hf.tiny_models import tiny_pair

    _, model = tiny_pair("llama", tie_word_embeddings=True)
    with Pager(_budget(nvme_dir, vram_pages=64, slab_pages=64)) as pager:
        before = move_dense_tensors_after_a_failed_move(model, pager, pager.device)
        now = dict([*model.named_parameters(), *model.named_buffers()])
        assert all(now[name] is tensor for name, tensor in before.items() if isinstance(tensor, torch.nn.Parameter))


def test_gpu_compiled_forward_streams_pages_with_the_same_tokens(nvme_dir):
    """``model.forward = torch.compile(model.forward)`` (inductor) under ``enable_paging`` on CUDA, fp32,
    a 700-token prompt streamed through 12 device pages: the paged cache and the ``"pagedllm"``
    attention run eagerly between the compiled pieces, and the tokens are the unpaged model's."""
    reference, model = _pair(torch.float32)
    ids, mask = _prompts(1, 700)
    expected = _generate(reference, ids, mask, 12)
    enable_paging(model, _budget(nvme_dir, vram_pages=12, slab_pages=8), attn_implementation="pagedllm", prefill_chunk_size=256)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward)
    try:
        got = _generate(model, ids, mask, 12)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    assert paging_state(model).pager.stats()["bytes_h2d"] > 0
