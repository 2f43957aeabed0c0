"""Which models enable_paging takes, and how: architectures outside the paged kernels keep their own
attention over the paged cache ("auto") with the unpaged model's tokens, and models the paged cache
cannot serve are refused with an error naming why, before any pager exists."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from pagedtensor import MemoryConfig, OutOfPagesError, enable_paging
from pagedtensor.hf import paging_state
from pagedtensor.hf.cache import ATTENTION_NAME
from pagedtensor.hf.model import _paged_attention_unsupported
from tests.hf.tiny_models import PAGE, TINY, prompts, tiny_budget, tiny_pair

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 6


def _pair(config_class, model_class, attn: str, **fields):
    config = config_class(**fields)
    config._attn_implementation = attn
    torch.manual_seed(0)
    reference = model_class(config).eval()
    return reference, copy.deepcopy(reference)


def _generate(model, ids, mask, new_tokens: int = NEW_TOKENS):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _mpt():
    fields = dict(n_layers=2, d_model=64, n_heads=4, max_seq_len=256, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _pair(transformers.MptConfig, transformers.MptForCausalLM, "eager", **fields)


# transformers 5.25 moved Falcon's attention onto the attention interface (it kept its own before).
FALCON_USES_THE_INTERFACE = tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (5, 25)


def _falcon(alibi: bool = False):
    """Falcon-40B's layout (rotary positions), or the ALiBi one of Falcon-RW (position biases added to the mask)."""
    fields = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, new_decoder_architecture=not alibi,
                  alibi=alibi, num_kv_heads=2, pad_token_id=0, eos_token_id=2)  # fmt: skip
    return _pair(transformers.FalconConfig, transformers.FalconForCausalLM, "sdpa", **fields)


def _falcon_alibi():
    return _falcon(alibi=True)


def _llama4_chunked():
    fields = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, intermediate_size_mlp=128, num_local_experts=2, vocab_size=128,
                  attention_chunk_size=8, no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"],
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return _pair(transformers.Llama4TextConfig, transformers.Llama4ForCausalLM, "sdpa", **fields)


def _git():
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4)
    fields = dict(vision_config=vision, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)  # fmt: skip
    return _pair(transformers.GitConfig, transformers.GitForCausalLM, "eager", **fields)


def _gemma3n_shared_kv():
    fields = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                  vocab_size=128, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, sliding_window=64,
                  layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2, laurel_rank=8, altup_num_inputs=2,
                  activation_sparsity_pattern=[0.0] * 4, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return _pair(transformers.Gemma3nTextConfig, transformers.Gemma3nForCausalLM, "sdpa", **fields)


def _jetmoe():
    """JetMoE's attention is a mixture of experts over heads: it repeats the keys the cache returns
    for each expert a token is routed to, keys the paged kernels never see."""
    fields = dict(num_hidden_layers=2, hidden_size=64, num_key_value_heads=2, kv_channels=16, intermediate_size=64, num_local_experts=4,
                  num_experts_per_tok=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return _pair(transformers.JetMoeConfig, transformers.JetMoeForCausalLM, "sdpa", **fields)


def _gemma4_shared_kv():
    """Gemma 4's small models' layout: the last layers reuse earlier layers' keys, and full-attention
    layers have twice the head size of sliding ones."""
    fields = dict(TINY, num_hidden_layers=4, head_dim=16, global_head_dim=32, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
                  layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=64, num_kv_shared_layers=2)  # fmt: skip
    return _pair(transformers.Gemma4TextConfig, transformers.Gemma4ForCausalLM, "sdpa", **fields)


@pytest.mark.parametrize(
    "build, words",
    [
        pytest.param(_mpt, "attention interface", id="mpt"),  # its own attention read SDPA's mask inverted
        # crashed inside transformers before 5.25; from 5.25 the paged kernels would drop its biases
        pytest.param(_falcon_alibi, "ALiBi" if FALCON_USES_THE_INTERFACE else "attention interface", id="falcon-alibi"),
        pytest.param(_llama4_chunked, "chunked_attention", id="llama4-chunked-attention"),  # attended across chunks
        pytest.param(_gemma3n_shared_kv, "num_kv_shared_layers", id="gemma3n-shared-kv"),  # shared layers saw one key
        pytest.param(_jetmoe, "mixture of attention heads", id="jetmoe"),  # "auto" took the kernels, then every generate raised
        pytest.param(_gemma4_shared_kv, "num_kv_shared_layers", id="gemma4-shared-kv",
                     marks=pytest.mark.skipif(not hasattr(transformers, "Gemma4TextConfig"), reason="transformers before Gemma 4")),
    ],
)
def test_models_outside_the_paged_kernels_keep_their_attention(build, words, nvme_dir):
    """Under the Triton interpreter "auto" picks the paged kernels where they apply: here they do not,
    so the model's own attention reads the paged cache and the tokens equal the unpaged model's."""
    reference, model = build()
    ids, mask = prompts(3, length=20)
    expected = _generate(reference, ids, mask)
    own = model.config._attn_implementation
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=4, host_pages=2), prefill_chunk_size=8)
    assert model.config._attn_implementation == own
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
    _, other = build()
    with pytest.raises(ValueError, match=words):
        enable_paging(other, tiny_budget(nvme_dir), attn_implementation="pagedllm")


_LEGACY = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MORE_FAMILIES = {  # name: (config, model, fields beyond TINY or instead of it, the reference's attention)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**TINY, "head_dim": 16}, "sdpa"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**TINY, "head_dim": 16, "sliding_window": 24, "query_pre_attn_scalar": 16}, "eager"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**TINY, "head_dim": 16, "sliding_window": 12, "query_pre_attn_scalar": 16,
                                                         "layer_types": ["sliding_attention", "full_attention"]}, "sdpa"),  # fmt: skip
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**TINY, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}, "sdpa"),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                                            "shared_expert_intermediate_size": 32}, "sdpa"),  # fmt: skip
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", TINY, "sdpa"),
    "cohere": ("CohereConfig", "CohereForCausalLM", TINY, "sdpa"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", TINY, "sdpa"),
    "phi": ("PhiConfig", "PhiForCausalLM", TINY, "sdpa"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {**TINY, "sliding_window": None}, "sdpa"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", TINY, "sdpa"),
    # Its full-attention layers keep the config's sliding_window as an attribute and pass the
    # attention sliding_window=None: they were given the window (tokens 0.45 apart).
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {**TINY, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
                "sdpa"),  # fmt: skip
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, **_LEGACY), "sdpa"),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", TINY, "sdpa"),
    # Their layers name the attention attn and were not found as decoder layers: they prefilled in one piece.
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, **_LEGACY), "sdpa"),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, n_ctx=256, **_LEGACY),
                "eager"),  # fmt: skip
    "opt": ("OPTConfig", "OPTForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                                                word_embed_proj_dim=64, max_position_embeddings=256, **_LEGACY), "sdpa"),  # fmt: skip
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, hidden_size=64, n_head=4, **_LEGACY), "eager"),
    # Its decoder layers return a tuple, (hidden_states,), and the model reads layer_outputs[0]: the
    # chunked prefill returned a bare tensor, whose [0] is the batch's first row (a shape error).
    "chameleon": ("ChameleonConfig", "ChameleonForConditionalGeneration", {
        **TINY, "vocabulary_map": {"<image>": 127, **{f"IMGIMG{chr(65 + i)}Z": 100 + i for i in range(16)}},
        "vq_config": dict(embed_dim=32, num_embeddings=16, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1,
                          latent_channels=32, attn_resolutions=[]),
    }, "sdpa"),  # fmt: skip
}


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_more_families_generate_the_unpaged_tokens(family, nvme_dir):
    """Each family under "auto" (the paged kernels where they apply), a left-padded batch, prefill in
    chunks, pages spilled off the device: the unpaged model's tokens."""
    config_name, model_name, fields, attn = MORE_FAMILIES[family]
    reference, model = _pair(getattr(transformers, config_name), getattr(transformers, model_name), attn, **fields)
    ids, mask = prompts(3, length=20)
    ids, mask = ids[:, 6:], mask[:, 6:]  # 14 tokens, rows 1 and 2 left-padded (1 and 13 pads)
    expected = _generate(reference, ids, mask, new_tokens=3)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=4, host_pages=2), prefill_chunk_size=8)
    got = _generate(model, ids, mask, new_tokens=3)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")
    assert paging_state(model).pager.stats()["bytes_d2h"] > 0


# Windows the models pass their attention no sliding_window for, nor keep on it: the cache keeps the
# config's window (transformers' DynamicCache(config=...)). Phimoe's masks slide by it over the prompt
# too; Moshi's mask causally, so its prompt sees every token and only the cache's window limits later keys.
CACHE_KEPT_WINDOWS = {
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {**TINY, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8}),
    "moshi": ("MoshiConfig", "MoshiForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                                      vocab_size=128, audio_vocab_size=64, num_codebooks=2, depth_num_hidden_layers=1,
                                                      depth_hidden_size=32, depth_num_attention_heads=2, ffn_dim=128, depth_ffn_dim=64,
                                                      sliding_window=8)),
}  # fmt: skip


@pytest.mark.parametrize("chunk", [None, 8], ids=["whole-prompt", "chunked-prompt"])
@pytest.mark.parametrize("attn", ["auto", ATTENTION_NAME])
@pytest.mark.parametrize("family", sorted(CACHE_KEPT_WINDOWS))
def test_a_window_only_the_cache_keeps_is_the_unpaged_models(family, attn, chunk, nvme_dir):
    """A prompt and a decode longer than a window the model names only in its config: the paged kernels
    (the Triton interpreter here) and the dense attention on the pages give the unpaged model's tokens
    and logits. They attended to every token: the window reached neither."""
    config_name, model_name, fields = CACHE_KEPT_WINDOWS[family]
    reference, model = _pair(getattr(transformers, config_name), getattr(transformers, model_name), "sdpa", **fields)
    ids = torch.randint(3, 128, (1, 17), generator=torch.Generator().manual_seed(1))  # in chunks: 8, 8 and 1 token
    mask = torch.ones_like(ids)
    expected = _generate(reference, ids, mask, new_tokens=6)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=4, host_pages=2), prefill_chunk_size=chunk, attn_implementation=attn)
    got = _generate(model, ids, mask, new_tokens=6)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")


@pytest.mark.skipif(not hasattr(transformers, "Gemma4TextConfig"), reason="transformers before Gemma 4")
@pytest.mark.parametrize("attn", ["auto", ATTENTION_NAME])
@pytest.mark.parametrize("global_kv_heads", [None, 1], ids=["same-kv-heads", "one-global-kv-head"])
def test_layers_of_other_head_sizes_generate_the_unpaged_tokens(attn, global_kv_heads, nvme_dir):
    """Gemma 4's full-attention layers have another head size (global_head_dim) than its sliding ones,
    and with attention_k_eq_v another number of KV heads (num_global_key_value_heads): transformers'
    per_layer_config. Each layer's pages take its own geometry (the cache raised at the first full
    layer). A left-padded batch, prefill in chunks, pages spilled off the device: the unpaged tokens,
    under the model's own attention and under the paged kernels (the Triton interpreter here; the
    window is not outgrown, so both kinds of layer run them, on pools of their own geometry)."""
    if global_kv_heads is None:
        reference, model = tiny_pair("gemma4", attention_k_eq_v=False, num_global_key_value_heads=None)
    else:
        reference, model = tiny_pair("gemma4", num_global_key_value_heads=global_kv_heads)
    ids, mask = prompts(3, length=20)
    ids, mask = ids[:, 6:], mask[:, 6:]
    expected = _generate(reference, ids, mask, new_tokens=8)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=4, host_pages=2), prefill_chunk_size=8, attn_implementation=attn)
    got = _generate(model, ids, mask, new_tokens=8)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")
    geometries = [layer.geometry for layer in got.past_key_values.layers]
    assert [(g.kv_heads, g.head_dim) for g in geometries] == [(2, 16), (global_kv_heads or 2, 32)]
    assert [g.page_tokens for g in geometries] == [PAGE // (2 * g.kv_heads * g.head_dim * 4) for g in geometries]
    assert paging_state(model).pager.stats()["bytes_d2h"] > 0


_LATENT_ATTENTION = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, num_key_value_heads=4)  # fmt: skip
LATENT_FAMILIES = {
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", {**TINY, **_LATENT_ATTENTION}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {**TINY, **_LATENT_ATTENTION, "n_group": 1, "topk_group": 1}),
}


def _latent_pair(family: str):
    config_name, model_name, fields = LATENT_FAMILIES[family]
    if not hasattr(transformers, config_name):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    return _pair(getattr(transformers, config_name), getattr(transformers, model_name), "sdpa", **fields)


@pytest.mark.parametrize("family", sorted(LATENT_FAMILIES))
def test_latent_attention_models_generate_the_unpaged_tokens_bit_for_bit(family, nvme_dir):
    """DeepSeek's multi-head latent attention caches its compressed latent (kv_lora_rank wide) as keys
    and the rotary part (qk_rope_head_dim) as values: states of two head sizes, which the cache
    refused at the first update ("key_states ... and value_states ... differ"). Each page now holds the
    tokens' keys and then their values, of sizes of their own. Under "auto" the model keeps its own
    attention (it attends to keys expanded from the latents, which the paged kernels never see) over
    the cache's dense states: a left-padded batch, prefill in chunks, pages spilled off the device,
    the unpaged model's tokens and logits bit for bit."""
    reference, model = _latent_pair(family)
    ids, mask = prompts(3, length=20)
    ids, mask = ids[:, 6:], mask[:, 6:]
    expected = _generate(reference, ids, mask, new_tokens=6)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=4, host_pages=2), prefill_chunk_size=8)
    assert model.config._attn_implementation == "sdpa"
    got = _generate(model, ids, mask, new_tokens=6)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        assert torch.equal(a, b), f"step {step}"
    geometries = {layer.geometry for layer in got.past_key_values.layers}
    assert [(g.kv_heads, g.head_dim, g.value_dim) for g in geometries] == [(1, 16, 8)]
    assert [g.page_tokens for g in geometries] == [PAGE // ((16 + 8) * 4)]
    assert paging_state(model).pager.stats()["bytes_d2h"] > 0


def test_latent_attention_models_are_refused_the_paged_kernels(nvme_dir):
    _, model = _latent_pair("deepseek_v3")
    with pytest.raises(ValueError, match=r"caches compressed latents \(config.kv_lora_rank=16"):
        enable_paging(model, tiny_budget(nvme_dir), attn_implementation=ATTENTION_NAME)
    assert paging_state(model) is None


def test_paged_attention_over_keys_other_than_the_cached_states_raises(nvme_dir):
    """A model that attends to keys made from the states it cached (as latent attention does) under
    the paged attention, which the cache answers with the new states only: attention over those
    would drop every earlier token. Here the latent model hides its kv_lora_rank from the check that
    refuses it the kernels; its second prefill chunk raises instead of computing a wrong answer."""
    _, model = _latent_pair("deepseek_v3")
    model.config.kv_lora_rank = 0  # read at construction only
    ids, mask = prompts(1, length=20)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=8, host_pages=8), attn_implementation=ATTENTION_NAME, prefill_chunk_size=8)
    with pytest.raises(RuntimeError, match="attends to keys .* other than the states it stored in the paged cache, which holds 16 positions"):
        _generate(model, ids, mask, new_tokens=1)


@pytest.mark.skipif(not hasattr(transformers, "DiffLlamaConfig"), reason="transformers without DiffLlama")
def test_paged_attention_over_values_other_than_the_cached_states_raises(nvme_dir):
    """DiffLlama attends to values it rebuilds from the cached ones (its halves): the paged attention
    read the stored values instead (logits off by up to 0.48). It raises naming the dense attention,
    which gives the unpaged tokens."""
    fields = {name: value for name, value in TINY.items() if name != "head_dim"}
    config = transformers.DiffLlamaConfig(**fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    reference = transformers.DiffLlamaForCausalLM(config).eval()
    ids, mask = prompts(1, length=12)
    expected = _generate(reference, ids, mask, new_tokens=3)
    model = copy.deepcopy(reference)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=8, host_pages=8), attn_implementation=ATTENTION_NAME)
    with pytest.raises(RuntimeError, match=r"attends to values .* other than the states it stored .*attn_implementation=\"sdpa\""):
        _generate(model, ids, mask, new_tokens=3)
    model = copy.deepcopy(reference)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=8, host_pages=8), attn_implementation="sdpa")
    assert torch.equal(_generate(model, ids, mask, new_tokens=3).sequences, expected.sequences)


@pytest.mark.skipif(not hasattr(transformers, "HrmTextConfig"), reason="transformers without HrmText")
def test_a_model_that_reuses_its_layers_attends_over_the_cache_slot_it_stored_to(nvme_dir):
    """HrmText runs its layers in cycles, each cycle storing to cache slot ``layer_idx + offset`` while
    the attention module keeps its ``layer_idx``: the paged attention took every slot past the first
    for no cache and attended over the new tokens alone (logits off by up to 8). It attends over
    the slot the keys went to: the unpaged tokens, logits within the kernels' tolerance."""
    config = transformers.HrmTextConfig(**{**TINY, "num_hidden_layers": 8, "num_layers_per_stack": 2, "H_cycles": 2, "L_cycles": 1,
                                           "L_bp_cycles": [1], "head_dim": 16, "initializer_range": 0.2})  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    reference = transformers.HrmTextForCausalLM(config).eval()
    model = copy.deepcopy(reference)
    ids, mask = prompts(1, length=12)
    expected = _generate(reference, ids, mask, new_tokens=4)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=16), attn_implementation=ATTENTION_NAME)
    got = _generate(model, ids, mask, new_tokens=4)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not hasattr(transformers, "BeamConfig"), reason="transformers without Beam")
def test_a_layer_taking_another_per_token_argument_runs_its_prompt_unchunked(nvme_dir):
    """Beam's layers take a per-token ``attention_scaling`` beside the position embeddings: the chunked
    prefill passed it whole to each chunk, a shape error on any prompt longer than a chunk. Such a
    layer runs its prompt whole: the unpaged tokens."""
    config = transformers.BeamConfig(**{**TINY, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                        "n_group": 1, "topk_group": 1, "sliding_window": 64,
                                        "layer_types": ["sliding_attention", "full_attention"], "mlp_layer_types": ["dense", "dense"]})  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    reference = transformers.BeamForCausalLM(config).eval()
    model = copy.deepcopy(reference)
    ids, mask = prompts(1, length=12)
    expected = _generate(reference, ids, mask, new_tokens=3)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=16), attn_implementation=ATTENTION_NAME, prefill_chunk_size=8)
    got = _generate(model, ids, mask, new_tokens=3)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_falcon_takes_the_paged_attention_once_transformers_gives_it_the_interface(nvme_dir):
    """Falcon with rotary positions under "auto": the paged attention from transformers 5.25 (its
    attention moved onto the interface), its own before; the unpaged model's tokens either way."""
    reference, model = _falcon()
    ids, mask = prompts(3, length=20)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=4, host_pages=2), prefill_chunk_size=8)
    assert model.config._attn_implementation == ("pagedllm" if FALCON_USES_THE_INTERFACE else "sdpa")
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")


def test_attn_implementation_must_be_a_string(nvme_dir):
    """An int failed inside transformers ("'int' object has no attribute 'startswith'")."""
    _, model = tiny_pair("llama")
    with pytest.raises(TypeError, match="attn_implementation: expected a string .* got 5"):
        enable_paging(model, tiny_budget(nvme_dir), attn_implementation=5)
    assert paging_state(model) is None and not _page_files(nvme_dir)


def test_a_model_that_cannot_switch_attention_refuses_another_implementation(nvme_dir):
    _, model = _mpt()
    with pytest.raises(ValueError, match="keeps 'eager'"):
        enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa")


def test_a_model_declaring_the_interface_gets_the_paged_attention_whatever_its_source_says(nvme_dir):
    """transformers decides whether a model can switch attention by reading its module's source for
    one idiom; remote code indexing the interface the older way fails that reading, yet declares
    ``_supports_attention_backend``: it was refused the paged attention."""
    reference, model = tiny_pair("llama")

    class SourceUnread(type(model)):
        @classmethod
        def _can_set_attn_implementation(cls) -> bool:
            return False

    model.__class__ = SourceUnread
    ids, mask = prompts(1, length=20)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="pagedllm", prefill_chunk_size=8)
    assert model.config._attn_implementation == "pagedllm"
    assert torch.equal(_generate(model, ids, mask).sequences, expected.sequences)


def test_remote_code_declaring_the_older_flash_flag_gets_the_paged_attention(nvme_dir):
    """Remote code written before transformers' _supports_flash_attn inherits PreTrainedModel's
    default of False but declares _supports_flash_attn_2: it kept the paged attention it had (it
    was refused it for a while). A model declaring neither (GIT, whose attention gave other tokens
    under the paged kernels) keeps its own."""
    reference, model = tiny_pair("llama")

    class RemoteStyle(transformers.PreTrainedModel, transformers.GenerationMixin):
        config_class = transformers.LlamaConfig
        _supports_attention_backend = True
        _supports_flash_attn_2 = True
        _supports_sdpa = True

        def __init__(self, config):
            super().__init__(config)
            self.model = transformers.LlamaModel(config)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None, **kwargs):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, use_cache=use_cache, **kwargs)  # fmt: skip
            return transformers.modeling_outputs.CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values)

    remote = RemoteStyle(copy.deepcopy(reference.config)).eval()
    remote.load_state_dict(reference.state_dict())
    assert RemoteStyle._supports_flash_attn is False  # transformers' default
    ids, mask = prompts(1, length=20)
    expected = _generate(reference, ids, mask)
    assert _paged_attention_unsupported(remote) is None  # so "auto" picks the paged attention where the kernels run
    del RemoteStyle._supports_flash_attn_2
    assert "_supports_flash_attn is False" in _paged_attention_unsupported(remote)
    RemoteStyle._supports_flash_attn_2 = True
    enable_paging(remote, tiny_budget(nvme_dir), attn_implementation="pagedllm", prefill_chunk_size=8)
    assert remote.config._attn_implementation == "pagedllm"
    assert torch.equal(_generate(remote, ids, mask).sequences, expected.sequences)


def test_git_keeps_its_own_attention(nvme_dir):
    """GIT never declares flash attention, and under the paged kernels it gave other tokens (on text
    alone too); its own attention over the paged cache gives the unpaged tokens (batch 1: its masks
    do not hide left pads, which the cache stores as zeros, so a padded batch differs)."""
    reference, model = _git()
    ids, mask = prompts(1, length=20)
    expected = _generate(reference, ids, mask)
    assert "_supports_flash_attn is False" in _paged_attention_unsupported(model)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=8), prefill_chunk_size=8)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(_generate(model, ids, mask).sequences, expected.sequences)


def _page_files(folder: str) -> set[str]:
    """Page files under ``folder`` this process holds open (they have no name: seen through /proc)."""
    return {path for path in (os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")) if path.startswith(str(folder))}


def test_a_refused_enable_paging_leaves_the_model_as_it_was_and_no_pager_open(nvme_dir):
    """Errors after the pager exists (a refused attention switch, weights that do not fit) close the
    pager enable_paging made (it stayed open until a garbage collection) and leave the model's
    attention and dense weights as they were."""
    _, mpt = _mpt()
    with pytest.raises(ValueError, match="keeps 'eager'"):
        enable_paging(mpt, tiny_budget(nvme_dir), attn_implementation="sdpa")
    assert not _page_files(nvme_dir)
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=20)
    expected = _generate(reference, ids, mask)
    no_room = MemoryConfig(vram_limit=3 * PAGE, host_memory=2 * PAGE, page_size=PAGE, device="cpu", slab_size=PAGE)
    with pytest.raises(OutOfPagesError):  # 2 layers of weights need ~50 pages: the tiers hold 5
        enable_paging(model, no_room, page_weights=True)
    assert model.config._attn_implementation == "sdpa" and paging_state(model) is None
    assert all(type(parameter) is torch.nn.Parameter for parameter in model.parameters())
    assert torch.equal(_generate(model, ids, mask).sequences, expected.sequences)


def test_a_failed_enable_paging_puts_back_an_attention_this_machine_cannot_load(nvme_dir):
    """The model's own attention comes back after an error even where transformers would refuse to
    switch to it (here: flash attention, which this machine cannot load); the caller sees the first
    error, and the pager is closed."""
    _, model = tiny_pair("llama", attn="eager")
    model.config._attn_implementation_internal = "flash_attention_2"  # as if loaded with it on a GPU
    with pytest.raises(ValueError, match="bogus"):
        enable_paging(model, tiny_budget(nvme_dir), attn_implementation="eager", stream_group_bytes="bogus")
    assert not _page_files(nvme_dir)
    assert model.config._attn_implementation == "flash_attention_2"


def _tiny_llava(text_attn: str, vision_attn: str):
    """A Llava whose towers attend as ``from_pretrained(attn_implementation={"text_config": text_attn, "vision_config": vision_attn})`` sets them."""
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4)
    config = transformers.LlavaConfig(text_config=transformers.LlamaConfig(**TINY), vision_config=vision, image_token_index=TINY["vocab_size"] - 1)
    config._attn_implementation = text_attn
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    for tower in {id(c): c for c in (model.config.vision_config, model.model.vision_tower.config)}.values():
        tower._attn_implementation_internal = vision_attn
    return model


def _attention_of(model) -> dict[str, str]:
    config = model.config
    return {"model": config._attn_implementation, "text": config.text_config._attn_implementation,
            "vision": config.vision_config._attn_implementation, "vision tower": model.model.vision_tower.config._attn_implementation}  # fmt: skip


def test_a_multimodal_model_keeps_each_towers_attention(nvme_dir):
    """A failed enable_paging put one attention back on every sub-config (the vision tower's eager
    became sdpa); a successful one switches the text model alone to the paged attention."""
    model = _tiny_llava("sdpa", "eager")
    before = _attention_of(model)
    with pytest.raises(ValueError, match="bogus"):
        enable_paging(model, tiny_budget(nvme_dir), stream_group_bytes="bogus")
    assert _attention_of(model) == before
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="pagedllm")
    assert _attention_of(model) == {"model": "pagedllm", "text": "pagedllm", "vision": "eager", "vision tower": "eager"}


def test_a_prefix_lm_keeps_its_attention(nvme_dir):
    """PaliGemma's image and prompt attend both ways (token_type_ids): the paged kernels, causal
    only, gave other tokens under "auto". Its own attention reads the paged cache instead."""
    text = transformers.GemmaConfig(**{**TINY, "initializer_range": 0.3})
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4)
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=TINY["vocab_size"] - 1, projection_dim=TINY["hidden_size"])
    config.vision_config.projection_dim = TINY["hidden_size"]
    reference, model = _pair(lambda **_: config, transformers.PaliGemmaForConditionalGeneration, "sdpa")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, TINY["vocab_size"] - 1, (1, 24), generator=generator)
    ids[:, 1:17] = config.image_token_index
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                  pixel_values=torch.randn(1, 3, 16, 16, generator=generator))  # fmt: skip
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = reference.generate(**inputs, **settings)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=4, host_pages=2), prefill_chunk_size=8)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(model.generate(**inputs, **settings), expected)
    with pytest.raises(ValueError, match="bidirectionally|_supports_flash_attn"):
        enable_paging(_pair(lambda **_: config, transformers.PaliGemmaForConditionalGeneration, "sdpa")[1], tiny_budget(nvme_dir), attn_implementation="pagedllm")


def test_a_model_without_input_embeddings_pages_its_weights(nvme_dir):
    """transformers raises NotImplementedError from get_input_embeddings for a model without them:
    that failed enable_paging after the weights were paged and the hooks set, leaving them so."""
    reference, model = tiny_pair("llama")

    def no_embeddings():
        raise NotImplementedError

    model.get_input_embeddings = no_embeddings
    ids, mask = prompts(1, length=20)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), prefill_chunk_size=8, page_weights=True)
    assert torch.equal(_generate(model, ids, mask).sequences, expected.sequences)


def test_encoder_decoder_models_are_refused(nvme_dir):
    """T5's cross-attention keys went into the same paged layers as its self-attention's: other logits."""
    config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=128)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with pytest.raises(TypeError, match="encoder-decoder"):
        enable_paging(model, tiny_budget(nvme_dir))


def test_a_decoder_given_encoder_states_is_refused(nvme_dir):
    """``WhisperForCausalLM`` (a decoder loaded alone: its config says not encoder-decoder) given
    ``encoder_outputs`` stored its cross-attention keys and values in the paged layer beside its
    own (33 positions where the unpaged cache's self-attention holds 13): other logits. That
    forward raises; without encoder states it generates the unpaged tokens."""
    config = transformers.WhisperConfig(decoder_layers=2, encoder_layers=2, d_model=64, decoder_attention_heads=4, encoder_attention_heads=4,
                                        decoder_ffn_dim=128, encoder_ffn_dim=128, vocab_size=128, num_mel_bins=8, max_source_positions=16,
                                        max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    reference = transformers.WhisperForCausalLM(config).eval()
    model = copy.deepcopy(reference)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=8, host_pages=8), attn_implementation="sdpa")
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    encoder_states = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(NotImplementedError, match="WhisperForCausalLM was given encoder_outputs"):
        model.generate(ids, encoder_outputs=(encoder_states,), max_new_tokens=3, do_sample=False)
    expected = reference.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), expected)


def test_cross_attention_layers_are_refused(nvme_dir):
    """Mllama's cross-attention layers (no config.layer_types) were accepted; generate then failed inside transformers."""
    text = transformers.MllamaTextConfig(**{**TINY, "num_hidden_layers": 3, "cross_attention_layers": [1]})
    vision = transformers.MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, num_attention_heads=2,
                                             image_size=16, patch_size=4, max_num_tiles=1, intermediate_layers_indices=[0],
                                             vision_output_dim=TINY["hidden_size"], supported_aspect_ratios=[[1, 1]])  # fmt: skip
    model = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=TINY["vocab_size"] - 1))
    with pytest.raises(TypeError, match=r"cross-attention layers \[1\]"):
        enable_paging(model, tiny_budget(nvme_dir))


STATEFUL = {  # name: (config, model, fields, words of the refusal)
    "rwkv": ("RwkvConfig", "RwkvForCausalLM", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                                                   intermediate_size=128), "recurrent state"),  # fmt: skip
    "xlstm": ("xLSTMConfig", "xLSTMForCausalLM", dict(vocab_size=128, hidden_size=64, embedding_dim=64, num_hidden_layers=2, num_blocks=2,
                                                      num_heads=2), "recurrent state"),  # fmt: skip
    # transformers 5.25 dropped _is_stateful; Mamba's config names its layers "linear_attention" there
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=8),
              r"recurrent state|layers of type \['linear_attention'\]"),  # fmt: skip
}


@pytest.mark.parametrize("family", sorted(STATEFUL))
def test_stateful_models_are_refused(family, nvme_dir):
    """Recurrent models keep a state the paged cache does not hold: xLSTM failed deep inside its
    layers ("matC_old has wrong shape"), RWKV ignored the cache (and was no longer refused under
    transformers 5.25, which dropped the _is_stateful flag)."""
    config_name, model_name, fields, words = STATEFUL[family]
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**fields)).eval()
    with pytest.raises(TypeError, match=words):
        enable_paging(model, tiny_budget(nvme_dir))
    assert paging_state(model) is None and not _page_files(nvme_dir)


def test_a_model_that_takes_no_cache_is_refused(nvme_dir):
    """OpenAI GPT computes every position again at each step: its forward takes no cache, so the first
    generate failed in transformers' check of its arguments ("model_kwargs are not used by the model:
    ['cache']"). It is refused, naming why, before any pager exists."""
    fields = dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=128)
    model = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**fields)).eval()
    with pytest.raises(TypeError, match=r"OpenAIGPTLMHeadModel takes no cache \(neither its forward nor its prepare_inputs_for_generation"):
        enable_paging(model, tiny_budget(nvme_dir))
    assert paging_state(model) is None and not _page_files(nvme_dir)


@pytest.mark.skipif(not hasattr(transformers, "Lfm2Config"), reason="transformers without LFM2")
def test_hybrid_models_are_refused_naming_their_layer_types(nvme_dir):
    config = transformers.Lfm2Config(**{**TINY, "layer_types": ["conv", "full_attention"]})
    model = transformers.Lfm2ForCausalLM(config).eval()
    with pytest.raises(TypeError, match=r"layers of type \['conv'\]"):
        enable_paging(model, tiny_budget(nvme_dir))


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
def test_the_final_norm_found_is_the_one_the_last_layers_output_goes_through(family, nvme_dir):
    """The final norm (chunked on long prompts, and watched for a user's hooks before in-place
    reuse) was looked up as ``model.norm`` only: GPT-2's ``ln_f``, GPT-NeoX's and OPT's
    ``final_layer_norm`` and MPT's ``norm_f`` were missed. The module found now receives exactly the
    last decoder layer's output (Bloom's embedding LayerNorm, before the layers, is not taken)."""
    from pagedtensor.hf.model import _decoder_layers, _decoder_module, _final_norm

    config_name, model_name, fields, attn = MORE_FAMILIES[family]
    _, model = _pair(getattr(transformers, config_name), getattr(transformers, model_name), attn, **fields)
    layers = _decoder_layers(model)
    norm = _final_norm(_decoder_module(model, layers))
    assert layers and norm is not None
    seen = {}

    def last_output(module, args, output) -> None:
        seen["last"] = output[0] if isinstance(output, tuple) else output

    def norm_input(module, args) -> None:
        seen["norm"] = args[0]

    layers[-1].register_forward_hook(last_output)
    norm.register_forward_pre_hook(norm_input)
    ids, mask = prompts(1, length=12)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert torch.equal(seen["norm"], seen["last"])
    enable_paging(model, tiny_budget(nvme_dir), prefill_chunk_size=8)
    assert norm in paging_state(model).reused
