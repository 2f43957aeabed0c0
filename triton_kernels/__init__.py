"""Triton kernels for paged KV: gather/scatter between pages and dense tensors, and attention that
reads K/V where the pages lie (decode, chunked prefill), with an exact log-sum-exp merge of partials.

Layout (vLLM-compatible): pages ``[num_pages, page_tokens, num_kv_heads, head_dim]``, ``block_table``
``[batch, max_pages]`` int32 in logical order, ``seq_lens`` ``[batch]`` int32. Every kernel is a
``torch.library.custom_op`` (namespace ``pagedllm``) with a fake implementation, so it traces under
``torch.compile``. Plain-torch references live in :mod:`pagedtensor.triton_kernels.reference`.
"""

from pagedtensor.triton_kernels.decode_attention import paged_decode_attention
from pagedtensor.triton_kernels.gather import paged_gather, paged_scatter
from pagedtensor.triton_kernels.merge import merge_attention_partials
from pagedtensor.triton_kernels.prefill_attention import paged_prefill_attention

__all__ = [
    "merge_attention_partials",
    "paged_decode_attention",
    "paged_gather",
    "paged_prefill_attention",
    "paged_scatter",
]
