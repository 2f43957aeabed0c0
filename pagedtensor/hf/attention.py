"""The ``"pagedllm"`` attention implementation for transformers: Triton paged kernels on the pages.

Registered with ``transformers.AttentionInterface`` under :data:`ATTENTION_NAME`. Each call follows
the :class:`~pagedtensor.hf.cache.PagedKVCache` update of the same layer (found through
:data:`~pagedtensor.hf.cache.ACTIVE_UPDATE`, since transformers does not hand the cache to attention
functions) and computes one partial per :class:`~pagedtensor.hf.cache.KeyPiece` the cache yields:
first the pages resident on the device, then the pages streamed in group by group. Partials are
merged exactly by log-sum-exp. A decode step uses ``paged_decode_attention``; a prefill chunk uses
``paged_prefill_attention`` (causal on the chunk's own pages, with positions shifted per piece).

Cases the kernels do not cover fall back to SDPA on keys and values materialized from the pages,
with an explicit mask (padding, causality, sliding window): a head size the kernels lack, logit
soft-capping, a sliding window the context has outgrown, an explicit attention mask, dropout, or
CPU tensors without the Triton interpreter. Without a paged cache behind the call (``use_cache=False``
or another cache), it runs SDPA on the keys and values it was given.

Note:
    Everything runs on the current (compute) stream. Block tables are staged in pinned host memory
    and copied with ``non_blocking=True``; the cache pins the pages of a piece until the kernel reading
    them is enqueued, and releasing records the event that orders any reuse of their slots.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from pagedtensor.interrupts import deferring
from pagedtensor.hf.cache import ACTIVE_UPDATE, ATTENTION_NAME, KeyPiece, PagedKVCache
from pagedtensor.tensor import run_outside_compile

log = logging.getLogger(__name__)

# Whether the running forward fills a PagedKVCache (set by enable_paging's forward pre-hook): then
# the cache knows the padding and the mask function hands attention the 2D mask as it is, instead
# of a [batch, 1, q_len, kv_len] mask (which would not fit at long context).
PAGED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("pagedllm_paged_forward", default=False)

# The sliding windows the model's own masks asked for in the running forward (transformers'
# ``create_sliding_window_causal_mask`` hands the mask function ``local_size``), set by
# :func:`pagedllm_mask` and emptied as each paged forward begins: a window the cache alone keeps
# (:attr:`PagedKVCache.windows`) that the model also masks by slides over a prompt too (Phimoe), one it
# does not mask by (Moshi) limits only the keys the cache keeps.
MASKED_WINDOWS: contextvars.ContextVar[frozenset] = contextvars.ContextVar("pagedllm_masked_windows", default=frozenset())

_registered = False


def register_attention() -> str:
    """Register :func:`pagedllm_attention` and :func:`pagedllm_mask` with transformers as ``"pagedllm"``
    (idempotent); return the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, pagedllm_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, pagedllm_mask)
        _registered = True
    return ATTENTION_NAME


def pagedllm_mask(**kwargs) -> Optional[torch.Tensor]:
    """transformers mask function for ``"pagedllm"``: the 2D padding mask as it is when a
    :class:`PagedKVCache` is being filled (the cache keeps the padding), else SDPA's mask."""
    if PAGED_FORWARD.get():
        window = kwargs.get("local_size")
        if isinstance(window, int) and window > 0:
            MASKED_WINDOWS.set(MASKED_WINDOWS.get() | {window})
        return kwargs.get("attention_mask")
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(**kwargs)


@run_outside_compile
def pagedllm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` ``[batch, heads, q_len, head_dim]`` → ``[batch, q_len, heads, head_dim]``.
    Under ``torch.compile`` it runs eagerly, never traced, as :meth:`PagedKVCache.update` does."""
    active = ACTIVE_UPDATE.get()
    if active is not None and active.cache is None:  # its cache is gone: no paged keys to read
        active = None
    layer_idx = getattr(module, "layer_idx", None)
    if active is not None and active.key is key:
        # The keys the cache just stored: attend over the slot they went to, which a model that reuses
        # its layers stores to by another index than the module's (HrmText's cycles: layer_idx + offset).
        layer_idx = active.layer_idx
        if active.value is not value:
            # Values made from the stored ones (DiffLlama's halves): the pages hold the stored values,
            # so attention over them would silently use other values than the model's.
            raise RuntimeError(
                f"pagedllm attention, layer {layer_idx}: the model attends to values {tuple(value.shape)} other than "
                f"the states it stored in the paged cache; this model needs its own attention over dense keys and "
                f"values: enable_paging(model, ..., attn_implementation=\"sdpa\") (or \"eager\")"
            )
    if active is None or active.layer_idx != layer_idx or active.key is not key:
        if active is not None and active.layer_idx == layer_idx and key.shape[2] != active.cache.get_seq_length(layer_idx):
            # This layer updated the paged cache, which handed back only the new states (the paged
            # attention reads the rest from the pages), but the model attends to other keys made from
            # them: attention over those alone would silently drop every earlier token.
            raise RuntimeError(
                f"pagedllm attention, layer {layer_idx}: the model attends to keys {tuple(key.shape)} other than the "
                f"states it stored in the paged cache, which holds {active.cache.get_seq_length(layer_idx)} positions; "
                f"this model needs its own attention over dense keys and values: enable_paging(model, ..., "
                f"attn_implementation=\"sdpa\") (or \"eager\")"
            )
        return _sdpa_without_cache(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    ACTIVE_UPDATE.set(None)
    cache = active.cache
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        attention_mask = None  # padding: the cache stored real tokens only and knows where they start
    window = _layer_window(module, kwargs)
    kept_start = None
    if window is None and "sliding_window" not in kwargs and attention_mask is None and cache.windows[layer_idx] is not None:
        # A window only the cache keeps (DynamicCache(config=...)'s window layer; the model passes its
        # attention none). One query sees the last ``window`` positions, the window's own; so do several
        # where the model's mask slides by it too (Phimoe). Where it masks causally (Moshi), the forward's
        # queries see, causally, the keys the window layer hands it (the last ``window - 1`` before the
        # forward's tokens; a prompt's chunk sees the chunks before it, as the whole prompt would), which
        # the kernels' sliding window is not: the dense attention on those, where they do not start at 0.
        layer = cache.layers[layer_idx]
        if (query.shape[2] == 1 and layer.cursor == 1) or cache.windows[layer_idx] in MASKED_WINDOWS.get():  # a decode step, or a sliding mask
            window = cache.windows[layer_idx]
        else:
            kept_start = max(layer.total - layer.cursor - cache.windows[layer_idx] + 1, 0)
    reason = _fallback_reason(cache, layer_idx, query, attention_mask, dropout if module.training else 0.0, window, kwargs)
    if reason is None and kept_start:
        reason = "several queries after a window the cache alone keeps"
    if reason is not None:
        log.debug("pagedllm attention, layer %s: dense attention on the pages (%s)", layer_idx, reason)
        start = kept_start if kept_start is not None else _window_keys_start(cache, layer_idx, query.shape[2], window, attention_mask)
        keys, values = cache.dense_kv(layer_idx, start)
        mask = attention_mask if attention_mask is not None else cache.dense_mask(layer_idx, query.shape[2], window)[..., start:]
        eager = _model_eager_attention(module, kwargs)
        if eager is not None:
            return eager(module, query, keys, values, _additive(mask, query.dtype), dropout=dropout, scaling=scaling, **kwargs)
        return _sdpa(query, keys, values, mask, scaling, dropout if module.training else 0.0), None
    return paged_attention(cache, layer_idx, query, scaling), None


def _window_keys_start(cache: PagedKVCache, layer_idx: int, q_len: int, window: Optional[int], attention_mask: Optional[torch.Tensor]) -> int:
    """The first position of the keys the dense fallback hands a layer: on a sliding-window layer
    those transformers' window layer hands the unpaged model (the last ``window - 1`` before the
    ``q_len`` new ones: the attention weights then have its shape), unless a 4-D mask of the model's
    covers every position (what ``get_mask_sizes`` asks for under ``"pagedllm"``); else 0."""
    if window is None:
        return 0
    total = cache.layers[layer_idx].total
    start = max(total - q_len - window + 1, 0)
    if attention_mask is not None and attention_mask.shape[-1] != total - start:
        return 0
    return start


@deferring
def paged_attention(cache: PagedKVCache, layer_idx: int, query: torch.Tensor, scaling: Optional[float] = None) -> torch.Tensor:
    """Attention of ``query`` ``[batch, heads, q_len, head_dim]`` over the layer's pages (its last
    update included); returns ``[batch, q_len, heads, head_dim]``."""
    from pagedtensor.triton_kernels import paged_decode_attention, paged_prefill_attention

    cache.pager.refuse_cuda_graph_capture()
    batch, heads, q_len, head_dim = query.shape
    q = query.transpose(1, 2)  # [batch, q_len, heads, head_dim], unit last stride
    decode = cache.is_decode(layer_idx)
    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    for piece in cache.key_pieces(layer_idx):
        k_pages, v_pages = cache.key_pools(piece.slab, layer_idx)
        block_table, seq_lens, q_start = _tables(piece, query.device)
        if decode:
            out, lse = paged_decode_attention(q[:, 0], k_pages, v_pages, block_table, seq_lens, scale=scaling, return_lse=True)
            out, lse = out[:, None], lse[:, None]
        else:
            out, lse = paged_prefill_attention(
                q, k_pages, v_pages, block_table, seq_lens, q_start if q_start is not None else 0,
                scale=scaling, causal=q_start is not None, return_lse=True,
            )
        outs.append(out)
        lses.append(lse)
    if not outs:
        return torch.zeros_like(q)
    if len(outs) == 1:
        return outs[0]
    return merge_partials(outs, lses)


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Exact log-sum-exp merge of attention partials over disjoint key sets, in one pass (fp32).

    Same formula as :func:`pagedtensor.triton_kernels.merge_attention_partials`, over stacked
    partials so that many streamed groups cost a few kernels rather than a few per group.
    """
    lse = torch.stack(lses).float()  # [P, ...]
    shift = lse.amax(dim=0)
    shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)
    weights = torch.exp(lse - shift)  # empty partials weigh exactly 0
    denom = weights.sum(dim=0)
    acc = (weights.unsqueeze(-1) * torch.stack(outs).float()).sum(dim=0)
    denom = torch.where(denom != 0, denom, torch.ones_like(denom))  # NaN propagates
    return (acc / denom.unsqueeze(-1)).to(outs[0].dtype)


def _tables(piece: KeyPiece, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The piece's block table, lengths and query starts as int32 tensors on ``device`` (one copy)."""
    batch = len(piece.seq_lens)
    width = max(1, max(len(row) for row in piece.block_table))
    flat: list[int] = []
    for row in piece.block_table:
        flat.extend(row)
        flat.extend([0] * (width - len(row)))
    flat.extend(piece.seq_lens)
    if piece.q_start is not None:
        flat.extend(piece.q_start)
    if device.type == "cuda":
        staged = torch.tensor(flat, dtype=torch.int32, pin_memory=True).to(device, non_blocking=True)
    else:
        staged = torch.tensor(flat, dtype=torch.int32, device=device)
    block_table = staged[: batch * width].view(batch, width)
    seq_lens = staged[batch * width : batch * width + batch]
    q_start = staged[batch * width + batch :] if piece.q_start is not None else None
    return block_table, seq_lens, q_start


def _layer_window(module: torch.nn.Module, kwargs: dict) -> Optional[int]:
    """The sliding window of this call's layer: the ``sliding_window`` the model passes the attention
    (``None`` on a full-attention layer: Exaone 4's keep the config's window as an attribute on
    every layer), else its attention module's attribute."""
    if "sliding_window" in kwargs:
        return kwargs["sliding_window"]
    return getattr(module, "sliding_window", None)


def _fallback_reason(cache: PagedKVCache, layer_idx: int, query: torch.Tensor, attention_mask, dropout: float, window, kwargs) -> Optional[str]:
    from pagedtensor.triton_kernels._common import HEAD_DIMS, KV_DTYPES, interpreting

    if query.shape[-1] not in HEAD_DIMS:
        return f"head_dim {query.shape[-1]} not in {HEAD_DIMS}"
    if query.dtype not in KV_DTYPES or query.dtype != cache.dtype:
        return f"dtype {query.dtype}"
    if query.device.type == "cpu" and not interpreting():
        return "CPU tensors without TRITON_INTERPRET=1"
    if query.device.type not in ("cpu", "cuda"):
        return f"device {query.device}"
    if attention_mask is not None:
        return "an explicit attention mask"
    if dropout:
        return "dropout"
    needs_eager = _needs_model_eager(kwargs)
    if needs_eager is not None:
        return needs_eager
    if window is not None and cache.get_seq_length(layer_idx) > window:
        return f"sliding window {window} outgrown"
    geometry = cache.layers[layer_idx].geometry
    if query.shape[1] % geometry.kv_heads:
        return "heads not a multiple of kv heads"
    if geometry.value_dim != geometry.head_dim:
        return f"values of head size {geometry.value_dim}, keys of {geometry.head_dim}"
    return None


def _sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor], scaling, dropout: float) -> torch.Tensor:
    """SDPA with grouped kv heads expanded; ``mask`` boolean (True = visible) or additive; returns ``[b, q, h, d]``."""
    group = query.shape[1] // keys.shape[1]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    if mask is not None and mask.dtype == torch.bool:
        # A query that sees no key (a pad) would give NaN: let it see everything; its output is unused.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _needs_model_eager(kwargs: dict) -> Optional[str]:
    """What the call asks for that neither the kernels nor SDPA apply (logit soft-capping,
    attention-sink logits, the attention weights of ``output_attentions=True``), or None."""
    if kwargs.get("output_attentions") or _records_attentions():
        return "output_attentions (the attention weights)"
    if kwargs.get("softcap") is not None:
        return "logit soft-capping"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention sink logits"
    return None


_OUTPUT_COLLECTOR_MODULES = ("transformers.utils.output_capturing", "transformers.utils.generic")
"""Where transformers keeps the forward's output collector (``_active_collector``), by version."""


def _records_attentions() -> bool:
    """Whether transformers records this forward's attention weights from the attention modules'
    outputs (``output_attentions=True``, read by its output-capturing hooks, which a model whose
    attention module takes the flag by name, GPT-2, does not hand the attention function)."""
    for name in _OUTPUT_COLLECTOR_MODULES:
        collector = getattr(sys.modules.get(name), "_active_collector", None)
        if collector is not None:
            collected = collector.get()
            return bool(collected) and "attentions" in collected
    return False


def _model_eager_attention(module: torch.nn.Module, kwargs: dict):
    """The model's own ``eager_attention_forward`` when :func:`_needs_model_eager` names something,
    else None: it applies it exactly as the unpaged model's eager attention does."""
    needs = _needs_model_eager(kwargs)
    if needs is None:
        return None
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"pagedllm attention: {type(module).__name__} needs {needs}, "
                                  "and its module has no eager_attention_forward to give it")  # fmt: skip
    return eager


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True = visible) as the additive mask eager attention adds to its scores."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _sdpa_without_cache(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """No paged cache behind this call: transformers' SDPA on the given keys and values (the model's
    eager attention where SDPA cannot apply soft-capping or sink logits)."""
    eager = _model_eager_attention(module, kwargs)
    if PAGED_FORWARD.get() and (attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2)):
        # The 2D padding mask as it came (None: no padding) of a forward that was expected to fill a
        # paged cache, whose cache took the dense path (:func:`pagedllm_mask`): causal, bottom-right
        # aligned, within the layer's sliding window (a query sees the keys less than ``window``
        # positions before it, as transformers' sliding mask).
        q_len, kv_len = query.shape[2], key.shape[2]
        query_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        key_pos = torch.arange(kv_len, device=query.device)
        visible = key_pos[None, :] <= query_pos[:, None]
        window = _layer_window(module, kwargs)
        if window is not None:
            visible &= key_pos[None, :] > query_pos[:, None] - window
        mask = visible[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, -kv_len:].to(query.device)
        if eager is not None:
            return eager(module, query, key, value, _additive(mask, query.dtype), dropout=dropout, scaling=scaling, **kwargs)
        return _sdpa(query, key, value, mask, scaling, dropout if module.training else 0.0), None
    if eager is not None:
        if attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True):
            # transformers' SDPA mask leaves out a causal one (None) where SDPA's ``is_causal`` gives
            # it (top-left aligned: a static cache's empty slots after the prompt lie past every
            # query), which the model's eager attention does not infer: it would see later tokens.
            causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
            attention_mask = causal[None, None]
        return eager(module, query, key, value, _additive(attention_mask, query.dtype), dropout=dropout, scaling=scaling, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
