"""Tiny random-weight causal LMs of five families, paired (a reference and an identical copy to page), and budgets."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pagedtensor import MemoryConfig  # noqa: E402

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 16}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
}
TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
PAGE = 4096  # 16 tokens of K+V per page for these models (2 kv heads x 16 x fp32 x 2)


# Layouts beyond the five families, by name, where this transformers has them: Gemma 4's
# full-attention layers have another head size than its sliding ones (global_head_dim), and their
# values are their keys (attention_k_eq_v: no v_proj), with num_global_key_value_heads of them.
OTHER_LAYOUTS = {}
if hasattr(transformers, "Gemma4TextConfig"):
    OTHER_LAYOUTS["gemma4"] = (transformers.Gemma4TextConfig, transformers.Gemma4ForCausalLM, {
        "head_dim": 16, "global_head_dim": 32, "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 8,
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64, "attention_k_eq_v": True,
        "num_global_key_value_heads": 2,
    })  # fmt: skip


def tiny_pair(family: str, seed: int = 0, attn: str = "sdpa", **overrides):
    """``(reference, copy)``: the same random weights, separate configs (attention is set per model);
    ``family`` one of :data:`FAMILIES` or :data:`OTHER_LAYOUTS`."""
    config_class, model_class, extra = FAMILIES[family] if family in FAMILIES else OTHER_LAYOUTS[family]
    config = config_class(**{**TINY, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    reference = model_class(config).eval()
    paged = model_class(copy.deepcopy(config)).eval()
    paged.load_state_dict(reference.state_dict())
    return reference, paged


def tiny_budget(nvme_path: str, vram_pages: int = 3, host_pages: int = 2, page_size: int = PAGE) -> MemoryConfig:
    """A budget of a few pages: pages go to host and disk while generating."""
    return MemoryConfig(
        vram_limit=vram_pages * page_size,
        host_memory=host_pages * page_size,
        page_size=page_size,
        nvme_path=nvme_path,
        device="cpu",
        slab_size=page_size,
    )


def prompts(batch: int, length: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts; with batch 3, rows 1 and 2 are left-padded (7 and 19 pads)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch == 3:
        mask[1, :7] = 0
        mask[2, :19] = 0
        ids[mask == 0] = TINY["pad_token_id"]
    return ids, mask


def output_cache(output):
    """The cache a generate output carries (``cache`` on transformers 5.2x, ``past_key_values`` on 5.17)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    return output.cache if "cache" in fields else output.past_key_values
