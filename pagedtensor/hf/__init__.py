"""Hugging Face transformers integration: a paged KV cache, the ``"pagedllm"`` attention, and
:func:`enable_paging` / :class:`PagedModel`. Needs the ``hf`` extra (transformers, accelerate)."""

from pagedtensor.hf.attention import pagedllm_attention, register_attention
from pagedtensor.hf.cache import ATTENTION_NAME, PagedKVCache
from pagedtensor.hf.model import GenerationMeasurement, PagedModel, enable_paging, measure_generate, paging_state

__all__ = [
    "ATTENTION_NAME",
    "GenerationMeasurement",
    "PagedKVCache",
    "PagedModel",
    "enable_paging",
    "measure_generate",
    "pagedllm_attention",
    "paging_state",
    "register_attention",
]
