"""PagedKVCache: a ``transformers`` Cache whose keys and values live in pager pages.

Layout. One pager page holds the keys and then the values of ``page_tokens`` consecutive tokens of
one sequence in one layer: ``[page_tokens, num_kv_heads, head_dim]`` keys, then
``[page_tokens, num_kv_heads, value_dim]`` values, in the model's dtype, where
``page_tokens = page_size // (num_kv_heads * (head_dim + value_dim) * itemsize)`` (any slack at the end of a
page is unused). Each layer has its own :class:`LayerGeometry`, learned from its first states: layers
of one model may have other head sizes or numbers of KV heads (Gemma 4's full-attention layers,
transformers' ``per_layer_config``), and a layer's values another size than its keys (``value_dim``:
DeepSeek's multi-head latent attention caches its compressed latent as keys and the rotary part as values). The pages of one (layer, sequence) are pages of pager allocations ("segments" of
``segment_pages`` pages) read as one logical run of pages: logical page ``p`` is page
``p % segment_pages`` of the allocation ``owners[p]``, so a page has the same place in its segment
whatever sequence refers to it. Sequences share pages by reference (beam search keeps a beam twice:
:meth:`PagedKVCache.reorder_cache`); a shared page is copied only when one of them writes it
(copy-on-write: normally the last, partly filled page), a page no sequence refers to is discarded,
and a segment is freed once no sequence refers to any of its pages or writes into it. A device-tier slab viewed as ``[slots, page_tokens, kv_heads, head_dim]``
with a page stride is the Triton kernels' page pool, and a page's device slot is its index in the
block table: attention reads pages where they lie, with no gather.

Padding. Only real tokens are stored: with a left-padded batch, sequence ``b`` holds
``length[b] <= total`` tokens and its pad positions (a prefix) are never written. ``total`` (what
``get_seq_length`` returns) counts pads too, as transformers expects. The padding of each forward
comes from :meth:`PagedKVCache.begin_forward`, which :func:`~pagedtensor.hf.model.enable_paging`
calls with the 2D attention mask before every forward. (Without it every token is stored; then the
``"pagedllm"`` attention receives transformers' 4D mask and computes SDPA on the dense pages: exact.)

Residency. The first ``sink_pages`` pages (attention sinks) and the newest page of every (layer,
sequence) are pinned on the device while they fit in ``hot_fraction`` of the device budget. Other
pages stay wherever the budget leaves them; when room is needed the cache evicts pages itself, from
the layer whose next use is furthest away (for the cyclic layer order of decoding, the layer just
computed), so the pages the next layers need stay put. Pages that are not on the device are
*streamed*: brought in a group of at most ``stream_group_bytes`` at a time into free slots, used,
and dropped again (they are clean: the host copy stays), so the resident set is never churned. A
window of two groups of free slots is kept, so the copy of group ``g+1`` (H2D stream) runs while
group ``g`` is read (compute stream). Nothing in a forward synchronizes the host with the device,
so the host runs ahead: the copies of layer ``l + 1``'s missing pages are queued on the H2D stream
while the device still computes layer ``l``, and the H2D stream moves pages back to back, each copy
waiting only for the kernel that last read its destination slots.

Note:
    Stream and event ordering, on CUDA. Every page this cache touches is pinned with
    :meth:`Pager.ensure_resident` (copies on the pager's H2D stream; the compute stream waits on
    their events with :meth:`ResidentPages.wait`) and released with :meth:`ResidentPages.release`
    right after the kernels reading or writing it are *enqueued* (an event on the compute stream
    orders any reuse of the slot). A streamed group is evicted only once the next group holds its
    slots, so consecutive groups alternate between two sets of slots. Write-backs of dirty pages run
    on the pager's D2H stream; the cache keeps ``2 * stream_group_pages`` slots free after each write,
    so the next write lands in slots whose write-back finished long before. Block tables reach the
    device through pinned staging tensors (``non_blocking`` copies, lifetimes held by the caching host
    allocator's events). The host never synchronizes with the device here, except in
    :meth:`PagedKVCache.begin_forward` when a padding mask has to be read (once per forward).
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
import operator
import sys
import threading
import weakref
from typing import Iterable, Iterator, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from pagedtensor.config import MemoryConfig, SizeLike, check_memory_config, format_size, parse_size
from pagedtensor.interrupts import deferring
from pagedtensor.pager import Allocation, Page, Pager, ResidentPages
from pagedtensor.tensor import run_outside_compile

log = logging.getLogger(__name__)

ATTENTION_NAME = "pagedllm"
DEFAULT_STREAM_GROUP_BYTES = 128 * 2**20
DEFAULT_SEGMENT_PAGES = 64


class ActiveUpdate:
    """The last :meth:`PagedKVCache.update` on this thread: the attention function that follows it
    in the same layer finds its cache here (transformers does not pass the cache to it), with the
    key and value states the update handed back, by which it knows the model attends to them. The
    cache is held weakly (None once gone): a cache used directly, with no model forward to end, and
    then dropped frees its pages, as a DynamicCache would."""

    __slots__ = ("_cache", "layer_idx", "key", "value")

    def __init__(self, cache: "PagedKVCache", layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self._cache, self.layer_idx, self.key, self.value = weakref.ref(cache), layer_idx, key, value

    @property
    def cache(self) -> Optional["PagedKVCache"]:
        return self._cache()


ACTIVE_UPDATE: contextvars.ContextVar[Optional[ActiveUpdate]] = contextvars.ContextVar("pagedllm_active_update", default=None)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerGeometry:
    """How one layer's keys and values lie in pages: a page holds ``page_tokens`` tokens' keys
    ``[page_tokens, kv_heads, head_dim]``, then their values ``[page_tokens, kv_heads, value_dim]``;
    a sequence's pages lie in segments (allocations) of ``segment_pages`` pages. Layers whose states
    have one shape share one geometry object, so it compares and hashes by identity (a cheap key of
    the kernels' pool views)."""

    kv_heads: int
    head_dim: int
    value_dim: int
    page_tokens: int
    segment_pages: int

    def page_count(self, length: int) -> int:
        """Pages holding ``length`` tokens."""
        return -(-length // self.page_tokens)


@dataclasses.dataclass
class KeyPiece:
    """Keys of one attention kernel call: per sequence, page slots of one device slab.

    ``block_table[b]`` lists slots local to slab ``slab`` (a partial page only last);
    ``seq_lens[b]`` counts the keys they hold. ``q_start`` is ``None`` when every query sees every
    key of the piece; otherwise the piece is a run of consecutive pages read causally and
    ``q_start[b]`` is the position of the chunk's first query counted from the piece's first key
    (negative for pad queries, which then see nothing).
    """

    slab: int
    block_table: list[list[int]]
    seq_lens: list[int]
    q_start: Optional[list[int]] = None


class _SequencePages:
    """The pages of one sequence in one layer.

    Logical page ``p`` is page ``p % segment_pages`` of allocation ``owners[p]``: a page sits at the
    same place in its allocation whatever sequence refers to it, so sequences that share a prefix
    (beams kept twice by ``reorder_cache``) share its pages by reference. ``segments[k]`` is the
    allocation this sequence writes new pages ``k * segment_pages ...`` into (``None`` until it needs one).
    ``geometry`` is its layer's.
    """

    __slots__ = ("geometry", "owners", "segments", "length", "hot")

    def __init__(self, geometry: LayerGeometry) -> None:
        self.geometry = geometry
        self.owners: list[Allocation] = []  # per logical page, the allocation holding it
        self.segments: list[Optional[Allocation]] = []  # per segment, the allocation new pages go to
        self.length = 0  # real tokens stored (pads excluded)
        self.hot: dict[int, ResidentPages] = {}  # logical page -> long-lived pin


def sliding_windows(config: object, num_layers: int) -> list[Optional[int]]:
    """Per decoder layer of ``config``, the window transformers' ``DynamicCache(config=...)`` keeps for
    it (a ``DynamicSlidingWindowLayer``'s ``sliding_window``: sliding and chunked attention), else None;
    all None without a config or where this transformers does not say."""
    windows: list[Optional[int]] = [None] * num_layers
    try:
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DynamicSlidingWindowLayer, get_layer_types_and_kwargs
    except ImportError:
        return windows
    if config is None:
        return windows
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
    except (AttributeError, TypeError, ValueError, KeyError):  # not a transformers config
        return windows
    per_layer = layer_kwargs if isinstance(layer_kwargs, list) else [layer_kwargs] * len(layer_types)  # 5.25 / 5.17
    for index, (layer_type, kwargs) in enumerate(zip(layer_types[:num_layers], per_layer)):
        layer_class = DYNAMIC_LAYER_TYPE_MAPPING.get(layer_type)
        window = kwargs.get("sliding_window") if isinstance(kwargs, dict) else None
        if isinstance(layer_class, type) and issubclass(layer_class, DynamicSlidingWindowLayer) and isinstance(window, int) and window > 0:
            windows[index] = window
    return windows


class PagedLayer(CacheLayerMixin):
    """One decoder layer's view of a :class:`PagedKVCache` (transformers talks to layers)."""

    is_compileable = False
    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, cache: "PagedKVCache", layer_idx: int) -> None:
        super().__init__()
        # A weak reference: a cycle between the cache and its layers would keep the cache, and its
        # pinned device pages, alive until a full garbage collection after the user drops it.
        self._cache = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.seqs: list[_SequencePages] = []
        self.total = 0  # tokens seen, pads included (transformers' sequence length)
        self.cursor = 0  # tokens of the current forward already appended
        self.len_before: list[int] = []  # per sequence, stored tokens before the last update
        self.last_q_len = 0
        self.geometry: Optional[LayerGeometry] = None  # set by the first update

    @property
    def cache(self) -> "PagedKVCache":
        cache = self._cache()
        if cache is None:
            raise RuntimeError(f"layer {self.layer_idx} of a PagedKVCache that no longer exists")
        return cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.geometry = self.cache._init_geometry(key_states, value_states)
        self.device = key_states.device
        self.seqs = [_SequencePages(self.geometry) for _ in range(key_states.shape[0])]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the keys the next update hands the model: every position, or on a
        sliding-window layer under a dense attention those transformers' window layer hands it."""
        start = self.cache.window_start(self.layer_idx, self.total)
        return self.total + query_length - start, start

    def get_seq_length(self) -> int:
        return self.total

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache._free_layer(self)

    def crop(self, tokens_to_remove: int) -> None:
        self.cache._crop_layer(self, tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.cache._reorder_layer(self, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.cache._repeat_layer(self, repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.cache._select_layer(self, indices)

    def offload(self) -> None:  # the pager moves pages; transformers' own offloading does not apply
        pass

    def prefetch(self) -> None:
        pass


def check_cache_settings(sink_pages: int, hot_fraction: float, stream_group_bytes: SizeLike) -> int:
    """Check :class:`PagedKVCache`'s placement settings (``enable_paging`` checks them before it
    changes the model, not at the first ``generate``); returns ``stream_group_bytes`` in bytes."""
    if isinstance(sink_pages, bool) or not isinstance(sink_pages, int) or sink_pages < 0:
        raise ValueError(f"sink_pages: expected a non-negative int, got {sink_pages!r}")
    if isinstance(hot_fraction, bool) or not isinstance(hot_fraction, (int, float)) or not 0 <= hot_fraction <= 1:
        raise ValueError(f"hot_fraction: expected a number in [0, 1], got {hot_fraction!r}")
    return parse_size(stream_group_bytes, "stream_group_bytes")


# Dynamo's entries of one function's code a compiled forward needs beside two a layer (transformers'
# ``deprecate_kwarg`` wrapper, shared by the model's, the decoder's and each attention's forward, took
# 10 for a Llama at every depth tried, 2 to 12 layers).
_COMPILED_ENTRIES_BESIDE_LAYERS = 16


def allow_compiled_entries_for_layers(num_layers: int) -> None:
    """Raise ``torch._dynamo.config.recompile_limit`` (never lower it) to what a compiled forward over
    a paged cache of ``num_layers`` layers needs. Each attention hands the cache update, run eagerly (a
    graph break), its ``layer_idx``, an int Dynamo specializes: the attention's code then takes two
    entries a layer (its prefill and its decode), and past torch's default limit of 8 the attention of
    every later layer ran uncompiled. Does nothing unless Dynamo is imported (transformers' models
    import it; raising a limit costs nothing where nothing compiles)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return
    needed = 2 * num_layers + _COMPILED_ENTRIES_BESIDE_LAYERS
    if dynamo.config.recompile_limit < needed:
        dynamo.config.recompile_limit = needed
    if dynamo.config.accumulated_recompile_limit < 2 * needed:
        dynamo.config.accumulated_recompile_limit = 2 * needed


class PagedKVCache(Cache):
    """A transformers ``Cache`` keeping K/V in pages of a :class:`~pagedtensor.pager.Pager`.

    Args:
        config: the model config (its text config gives the number of layers); or pass ``num_layers``.
        pager: the pager holding the pages (shared, e.g. with the model's other paged tensors). Its
            ``prefetch_strategy`` should be ``"none"``: the cache schedules its own transfers.
        memory_config: used to create a pager when ``pager`` is None (the cache then owns and closes it).
        num_layers: decoder layers, when no config is given.
        sink_pages: first pages of every sequence kept pinned on the device (attention sinks).
        hot_fraction: sink and newest pages are pinned only while they take at most this share of
            the device budget.
        stream_group_bytes: bytes of pages streamed in per kernel call.
        max_tokens: expected tokens per sequence (prompt + new tokens): sizes the page segments.
        makes_room: the cache makes room on the device tier itself (default): it evicts its own
            pages in decoding's layer cycle (the layer computed last first), keeps two streaming
            groups of slots free, and evicts each streamed group once the next one has arrived. Right
            when its pages are all the pager moves. ``False`` when the pager also holds other pages
            used in a loop, such as paged layer weights (``enable_paging(page_weights=True)``): the
            pager's policy then makes room, and the cache's pages, used once a pass but not advised
            ``"loop"``, leave after the loop's (:meth:`Pager.advise`); a layer's keys and values that
            fit stay resident instead of being evicted to keep a window free and streamed back.

    With the ``"pagedllm"`` attention implementation, :meth:`update` returns the new keys and values
    unchanged and the attention reads the pages; with any other implementation it returns the dense
    keys and values of the layer, materialized from the pages (exact, for tests and short contexts).
    """

    def __init__(
        self,
        config: object = None,
        *,
        pager: Optional[Pager] = None,
        memory_config: Optional[MemoryConfig] = None,
        num_layers: Optional[int] = None,
        sink_pages: int = 1,
        hot_fraction: float = 0.25,
        stream_group_bytes: SizeLike = DEFAULT_STREAM_GROUP_BYTES,
        max_tokens: Optional[int] = None,
        makes_room: bool = True,
    ) -> None:
        text_config = None
        if config is not None:
            text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = getattr(text_config, "num_hidden_layers", num_layers)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int (or a config with num_hidden_layers), got {num_layers!r}")
        stream_group_bytes = check_cache_settings(sink_pages, hot_fraction, stream_group_bytes)
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens: expected a positive int or None, got {max_tokens!r}")
        if not isinstance(makes_room, bool):
            raise TypeError(f"makes_room: expected a bool, got {makes_room!r}")
        check_memory_config(memory_config)
        if pager is not None and memory_config is not None:
            raise ValueError("pass either pager or memory_config, not both")
        if pager is not None and not isinstance(pager, Pager):
            raise TypeError(f"pager: expected a pagedtensor.Pager, got {type(pager).__name__}")
        owns_pager = pager is None
        if pager is None:
            pager = Pager(streaming_config(memory_config if memory_config is not None else MemoryConfig()))
        if pager.config.prefetch_strategy != "none":
            log.warning("PagedKVCache: the pager's prefetch_strategy is %r; the cache schedules its own transfers and "
                        "sequential prefetches only take slots it needs (use streaming_config())", pager.config.prefetch_strategy)
        super().__init__(layers=[PagedLayer(self, index) for index in range(num_layers)])
        allow_compiled_entries_for_layers(num_layers)
        self.config = config
        # Per layer, the sliding window transformers' own cache keeps (None: every token): under a dense
        # attention such a layer is handed the keys that cache would hand it, and masked alike.
        self.windows = sliding_windows(config, num_layers)
        for layer, window in zip(self.layers, self.windows):
            layer.is_sliding = window is not None
        self.pager = pager
        self.sink_pages = sink_pages
        self.hot_fraction = float(hot_fraction)
        self.stream_group_bytes = stream_group_bytes
        self.max_tokens = max_tokens
        self.makes_room = makes_room
        # Set by the first update: what every layer shares; each layer's geometry is its own.
        self.dtype: Optional[torch.dtype] = None
        self.device: Optional[torch.device] = None
        self.batch_size_: Optional[int] = None
        self._geometries: dict[tuple[int, int, int], LayerGeometry] = {}  # by (kv heads, head_dim, value_dim)
        self.group_pages = 1
        self.window_pages = 2
        self.hot_enabled = False
        self._forward_pads: Optional[list[int]] = None
        self._pools: dict[tuple[int, LayerGeometry], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pending_stream: list[tuple[Allocation, int, int]] = []  # the last streamed group, evicted after the next
        self._allocations: list[Allocation] = []
        # Sharing: sequences referring to each page ``(allocation, index)``, and references to each
        # allocation (its referred pages plus the sequences writing into it): freed at zero.
        self._page_refs: dict[tuple[Allocation, int], int] = {}
        self._holds: dict[Allocation, int] = {}
        self.pages_copied = 0  # pages copied because a shared page was written (copy-on-write)
        self._hot_pins: dict[int, ResidentPages] = {}
        self._in_use = threading.Lock()  # held by the thread running a forward or generate on the cache
        self._user: Optional[int] = None  # that thread's ident
        self.closed = False
        self._finalizer = weakref.finalize(self, _release_pages, pager, self._allocations, self._hot_pins, owns_pager)

    # ------------------------------------------------------------------ transformers Cache API

    @run_outside_compile
    @deferring
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states`` ``[batch, kv_heads, q_len, head_dim]`` and ``value_states``
        ``[batch, kv_heads, q_len, value_dim]`` to layer ``layer_idx``.

        Returns them unchanged under the ``"pagedllm"`` attention (which reads the pages), else the
        layer's dense keys and values ``[batch, kv_heads, total, head_dim or value_dim]`` (pads zero;
        on a sliding-window layer those from :meth:`window_start` on, as transformers' window cache).
        Under ``torch.compile`` it runs eagerly, never traced (the pager's work is Python: locks,
        streams, page tables): one graph break a call.
        """
        self._refuse_closed()
        self.pager.refuse_cuda_graph_capture()  # before any page or length changes
        _refuse_fake_run(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            raise RuntimeError(
                "PagedKVCache keeps keys and values in pages, outside autograd: gradients would not flow through "
                "the cached keys and values. Generate under torch.no_grad() or torch.inference_mode(), or train "
                "with use_cache=False or a DynamicCache"
            )
        key_states, value_states = self._in_one_dtype(key_states, value_states)
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        self._check_states(layer, key_states, value_states)
        q_len = key_states.shape[2]
        cursor = layer.cursor
        counts = self._take_valid(layer, q_len)
        len_before = [seq.length for seq in layer.seqs]
        try:
            for b, seq in enumerate(layer.seqs):
                n = counts[b]
                if n:
                    self._write_tokens(layer, seq, key_states[b], value_states[b], q_len - n, n)
            self._keep_window(layer_idx)  # room for the next streamed pages (evictions: no byte lost if it fails)
        except BaseException:
            # All or nothing, as DynamicCache's update: the sequences written keep none of the new
            # tokens, and every page taken for them goes.
            layer.cursor = cursor
            for seq, length in zip(layer.seqs, len_before):
                self._cut_sequence(seq, length)
            raise
        layer.len_before = len_before
        layer.total += q_len
        layer.last_q_len = q_len
        if self.uses_paged_attention:
            ACTIVE_UPDATE.set(ActiveUpdate(self, layer_idx, key_states, value_states))
            return key_states, value_states
        ACTIVE_UPDATE.set(None)
        return self.dense_kv(layer_idx, self.window_start(layer_idx, layer.total - q_len))

    def window_start(self, layer_idx: int, seen: int) -> int:
        """The first position of the keys an update after ``seen`` positions (pads included) hands a
        sliding-window layer under a dense attention, as transformers' ``DynamicSlidingWindowLayer``
        does: the last ``window - 1`` before the new ones (the window's mask then covers the same keys,
        so the model's attention runs on the same operands as unpaged); 0 for any other layer, and
        under the ``"pagedllm"`` attention, which reads the pages itself."""
        window = self.windows[layer_idx]
        if window is None or self.uses_paged_attention:
            return 0
        return max(seen - window + 1, 0)

    @property
    def uses_paged_attention(self) -> bool:
        """Whether the model attends with the ``"pagedllm"`` implementation (then update() returns no dense K/V)."""
        return getattr(self.config, "_attn_implementation", None) == ATTENTION_NAME

    def begin_forward(self, attention_mask: Optional[torch.Tensor], q_len: int) -> None:
        """Record the padding of the next forward (its ``q_len`` new tokens) from a 2D attention mask.

        Only left padding is supported: in every sequence the masked tokens come before every real
        one. Reads the mask on the host (one synchronization; a second where the new tokens hold pads).
        """
        _refuse_fake_run(attention_mask)
        for layer in self.layers:
            layer.cursor = 0
        self._forward_pads = None
        if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            return
        mask = attention_mask.bool()
        new = mask[:, -q_len:] if q_len else mask[:, :0]
        if new.shape[1] != q_len:
            return
        new_all_real = self._read_new_checking_cached(mask, new)
        if new_all_real:
            return
        valid = new.cpu()
        counts = valid.sum(dim=1).tolist()
        suffix = torch.arange(q_len, device="cpu")[None, :] >= (q_len - torch.tensor(counts, device="cpu"))[:, None]
        if not torch.equal(valid, suffix):
            raise ValueError("PagedKVCache supports left padding only: in each sequence of the attention mask, "
                             "masked tokens must all come before the real ones")
        self._forward_pads = [q_len - count for count in counts]

    def _read_new_checking_cached(self, mask: torch.Tensor, new: torch.Tensor) -> bool:
        """Whether every one of the forward's tokens ``new`` is real, read in the one synchronization
        that also checks the mask's columns of the tokens already cached: they must mark what the
        cache holds, each sequence's pads (which it does not store) first, then its stored tokens
        (each row rising from 0 to 1, as many ones as the sequence stored). The paged attention reads
        the stored tokens whatever the mask says, so a mask that hides one of them now (a masked
        token after real ones, or a token attended before) raises rather than be ignored."""
        layer = self.layers[0] if self.layers else None
        past = mask.shape[1] - new.shape[1]
        if layer is None or not layer.is_initialized or past == 0 or past != layer.total or mask.shape[0] != len(layer.seqs):
            return bool(new.all())  # (a batch other than the cache's: the write's check names it)
        cached = mask[:, :past]
        rising = (cached[:, 1:] >= cached[:, :-1]).all()
        summary = torch.cat([new.all().reshape(1), rising.reshape(1), cached.sum(dim=1)]).tolist()
        if not summary[1] or summary[2:] != [seq.length for seq in layer.seqs]:
            raise ValueError(
                "PagedKVCache supports left padding only: the attention mask's columns of the cached tokens must "
                "mark each sequence's pads first, then every token it stored (this mask hides a cached token, "
                "a masked token after real ones, or shows a pad as real)"
            )
        return bool(summary[0])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].total

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        """Whether states have been stored (as ``DynamicCache`` answers once its layers are filled): models
        such as PaliGemma read it to tell the first forward, whose prefix attends both ways, from later
        ones. ``Cache.is_initialized`` counts only layers that support early initialization, which
        these do not, so it would answer False forever."""
        return bool(self.layers) and all(layer.is_initialized for layer in self.layers)

    @deferring
    def reset(self) -> None:
        """Drop every token (pages freed); the cache can be filled again, with any batch size (as
        ``DynamicCache``): the geometry is learned again from the next states."""
        for layer in self.layers:
            self._free_layer(layer)
            layer.seqs = []
            layer.is_initialized = False
            layer.geometry = None
        self.dtype = None
        self._forward_pads = None  # the last forward's padding describes none of the tokens to come
        self._geometries.clear()
        self._pools.clear()  # views of the slabs in the geometries before the reset

    def __deepcopy__(self, memo: dict) -> "PagedKVCache":
        raise TypeError(
            "copy.deepcopy of a PagedKVCache: its keys and values live in a Pager's pages, which are not copied. "
            "To reuse a prompt's keys and values for several continuations, crop the cache back to the prompt "
            "between them (cache.crop(-tokens_added_since)), or make a cache for each"
        )

    def __reduce_ex__(self, protocol: object) -> tuple:
        raise TypeError(
            "pickle or torch.save of a PagedKVCache: its keys and values live in a Pager's pages, which are not saved. "
            "Save the tokens (a generate output's .sequences, or the output with its cache set to None: output.cache, "
            "output.past_key_values in older transformers) or "
            "each layer's keys and values as plain tensors (cache.dense_kv(layer_idx))"
        )

    def claim(self) -> bool:
        """Mark the cache in use by this thread for a forward or a ``generate`` (the forward pre-hook and
        ``generate`` wrapper of :func:`~pagedtensor.hf.model.enable_paging` call it); True if this call
        claimed it, False if this thread holds it already (a ``generate``'s own forwards). A cache is
        one sequence of forwards: two threads filling it at once would interleave their tokens, so
        a claim while another thread holds it raises ``RuntimeError``. Undo with :meth:`unclaim`."""
        me = threading.get_ident()
        if self._user == me:
            return False
        if not self._in_use.acquire(blocking=False):
            raise RuntimeError(
                f"this PagedKVCache is in use by another thread (ident {self._user}): a cache holds one sequence of "
                "forwards and cannot be filled by two threads at once. Give each thread its own cache (generate "
                "without a cache makes one per call)"
            )
        self._user = me
        return True

    def unclaim(self) -> None:
        """End this thread's :meth:`claim`."""
        if self._user == threading.get_ident():
            self._user = None
            self._in_use.release()

    @deferring
    def release_hot_pins(self) -> None:
        """Unpin the sink and newest pages of every sequence: they stay where they are, evictable like
        any other page, and the next update pins them again. ``generate`` calls it on the cache it
        hands back (in its output, or the caller's own): a cache kept between generates would
        otherwise hold device slots that later generates on the same pager cannot use."""
        for layer in self.layers:
            for seq in layer.seqs:
                for pin in seq.hot.values():
                    self._hot_pins.pop(id(pin), None)
                    if not pin.released:
                        pin.release()
                seq.hot.clear()

    def close(self) -> None:
        """Free every page (and close the pager if this cache created it). Idempotent."""
        if not self.closed:
            self.closed = True
            self._pending_stream = []
            self._page_refs.clear()
            self._holds.clear()
            self._finalizer()

    # ------------------------------------------------------------------ geometry

    def _init_geometry(self, key_states: torch.Tensor, value_states: torch.Tensor) -> LayerGeometry:
        """The geometry of a layer whose first keys are ``key_states`` ``[batch, kv_heads, q_len, head_dim]``
        and values ``value_states`` ``[batch, kv_heads, q_len, value_dim]``. The first layer filled sets
        what every layer shares (batch, dtype, device) and the streaming window; a later layer must
        agree on those, and may have other heads."""
        self._check_pair(key_states, value_states)
        batch, kv_heads, _, head_dim = key_states.shape
        value_dim = value_states.shape[3]
        if self.dtype is not None and (batch, key_states.dtype) != (self.batch_size_, self.dtype):
            raise ValueError(
                f"layer states {tuple(key_states.shape)} {key_states.dtype} differ from the cache's batch "
                f"{self.batch_size_} and dtype {self.dtype}"
            )
        if key_states.device != self.pager.device:
            raise ValueError(
                f"the model's keys are on {key_states.device} but the pager's device tier is {self.pager.device}: "
                f"use MemoryConfig(device={str(key_states.device)!r}) or move the model"
            )
        geometry = self._geometries.get((kv_heads, head_dim, value_dim))
        if geometry is None:
            geometry = self._new_geometry(kv_heads, head_dim, value_dim, key_states.dtype)
        if self.dtype is None:
            self._init_shared(batch, key_states.dtype, key_states.device)
        self._geometries[(kv_heads, head_dim, value_dim)] = geometry
        return geometry

    def _new_geometry(self, kv_heads: int, head_dim: int, value_dim: int, dtype: torch.dtype) -> LayerGeometry:
        """Pages of ``kv_heads`` x ``head_dim`` keys and ``kv_heads`` x ``value_dim`` values in ``dtype``;
        ValueError if a page cannot hold one token."""
        token_bytes = kv_heads * (head_dim + value_dim) * dtype.itemsize
        page_tokens = self.pager.page_size // token_bytes
        if page_tokens < 1:
            sizes = f"{head_dim}" if value_dim == head_dim else f"({head_dim} + {value_dim})"
            raise ValueError(
                f"page_size: {self.pager.page_size} bytes cannot hold the keys and values of one token "
                f"({token_bytes} bytes for {kv_heads} kv heads x {sizes} x {dtype}); use a page_size of at least "
                f"{1 << max(12, (token_bytes - 1).bit_length())}"
            )
        segment_pages = DEFAULT_SEGMENT_PAGES
        if self.max_tokens is not None:
            # One segment for the tokens expected, but no larger than the device tier can hold (or the
            # default): max_new_tokens is a bound, often far above what is generated, and every page of an
            # allocation costs a page-table entry at allocate (generate(max_new_tokens=10**8) on a tiny
            # model took 23 s and 2 GB of host memory for a 3-token answer). Longer sequences take more segments.
            capacity = self.pager.device_tier.capacity_pages
            segment_pages = max(1, min(math.ceil(self.max_tokens / page_tokens), max(DEFAULT_SEGMENT_PAGES, capacity)))
        log.debug("PagedKVCache: %d tokens of %d kv heads x (%d + %d) per page of %s", page_tokens, kv_heads, head_dim,
                  value_dim, format_size(self.pager.page_size))
        return LayerGeometry(kv_heads, head_dim, value_dim, page_tokens, segment_pages)

    def _init_shared(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Set what every layer shares, at the first update of an empty cache: batch, dtype, device,
        the streaming window and whether sink and newest pages are pinned."""
        self.dtype, self.device, self.batch_size_ = dtype, device, batch
        capacity = self.pager.device_tier.capacity_pages
        hot = self._hot_pages(batch)
        spare = capacity - (hot if self._hot_pins_fit(hot, working_pages=2) else 0)
        self.group_pages = max(1, min(self.stream_group_bytes // self.pager.page_size, spare // 4))
        self.window_pages = 2 * self.group_pages
        self._size_hot_pins(batch)
        log.debug("PagedKVCache: %d device slots, streaming groups of %d pages, hot pins %s",
                  capacity, self.group_pages, "on" if self.hot_enabled else "off")

    def _common(self, field: str) -> int:
        """``field`` of the filled layers' geometries (0 before any update); ValueError where they differ."""
        value = self._per_layer(field)
        if isinstance(value, list):
            raise ValueError(f"the layers of this cache differ in {field} ({sorted(set(value) - {None})}): read cache.layers[i].geometry")
        return value

    def _per_layer(self, field: str) -> object:
        """``field`` of the layers' geometries: one int where every filled layer has the same, else a list per layer (None: not filled)."""
        values = [None if layer.geometry is None else getattr(layer.geometry, field) for layer in self.layers]
        filled = {value for value in values if value is not None}
        return values if len(filled) > 1 else (filled.pop() if filled else 0)

    @property
    def num_kv_heads(self) -> int:
        """KV heads of every layer (0 before the first update); ValueError where layers differ."""
        return self._common("kv_heads")

    @property
    def head_dim(self) -> int:
        """Head size of every layer (0 before the first update); ValueError where layers differ."""
        return self._common("head_dim")

    @property
    def value_dim(self) -> int:
        """Value head size of every layer (0 before the first update); ValueError where layers differ."""
        return self._common("value_dim")

    @property
    def page_tokens(self) -> int:
        """Tokens per page of every layer (0 before the first update); ValueError where layers differ."""
        return self._common("page_tokens")

    @property
    def segment_pages(self) -> int:
        """Pages per segment of every layer (0 before the first update); ValueError where layers differ."""
        return self._common("segment_pages")

    def _hot_pages(self, batch: int) -> int:
        """Most pages the hot pins of a batch of ``batch`` hold: sink and newest pages of every (layer, sequence)."""
        return len(self.layers) * batch * (self.sink_pages + 1)

    def _hot_pins_fit(self, hot: int, working_pages: int) -> bool:
        """Whether ``hot`` pinned pages fit in ``hot_fraction`` of the device tier and leave
        ``working_pages`` slots for the pages an update or a read holds at once (a streaming window;
        at least two: a shared page copied on write is read and written together)."""
        capacity = self.pager.device_tier.capacity_pages
        return hot <= self.hot_fraction * capacity and hot + max(2, working_pages) <= capacity

    def _size_hot_pins(self, batch: int) -> None:
        """Pin sink and newest pages only while those of a batch of ``batch`` fit in ``hot_fraction`` of the
        device tier and leave a streaming window free (with ``hot_fraction=1`` the pins could otherwise
        take every slot, and the next page faulted in found none): a batch grown by
        ``batch_repeat_interleave`` or a reorder may unpin them all."""
        enabled = self._hot_pins_fit(self._hot_pages(batch), self.window_pages)
        if self.hot_enabled and not enabled:
            self.release_hot_pins()
        self.hot_enabled = enabled

    def _in_one_dtype(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values in the dtype both promote to, or in the cache's when that holds it exactly:
        under autocast, Llama's rotary embedding leaves keys in float32 and values in bfloat16
        (attention then casts both alike, so storing the wider type changes no result)."""
        if key_states.dtype == value_states.dtype and self.dtype in (None, key_states.dtype):
            return key_states, value_states  # every update but under autocast: nothing to convert
        target = torch.promote_types(key_states.dtype, value_states.dtype)
        if self.dtype is not None and torch.promote_types(target, self.dtype) == self.dtype:
            target = self.dtype
        if key_states.dtype != target:
            key_states = key_states.to(target)
        if value_states.dtype != target:
            value_states = value_states.to(target)
        return key_states, value_states

    @staticmethod
    def _check_pair(key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Keys and values ``[batch, kv_heads, q_len, *]`` of one batch, heads and length (their last
        dims, the head sizes, may differ)."""
        if key_states.dim() != 4 or value_states.dim() != 4 or key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(
                f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)}: a PagedKVCache holds "
                f"states [batch, kv_heads, q_len, head size] whose batch, kv heads and length agree (only the head sizes may differ)"
            )

    def _check_states(self, layer: PagedLayer, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._check_pair(key_states, value_states)
        geometry = layer.geometry
        if (key_states.shape[0] != self.batch_size_ or key_states.shape[1] != geometry.kv_heads
                or key_states.shape[3] != geometry.head_dim or value_states.shape[3] != geometry.value_dim):  # fmt: skip
            raise ValueError(
                f"layer {layer.layer_idx}: expected keys [batch={self.batch_size_}, kv_heads={geometry.kv_heads}, q_len, "
                f"{geometry.head_dim}] and values [..., {geometry.value_dim}], got {tuple(key_states.shape)} and "
                f"{tuple(value_states.shape)}"
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype} states, got {key_states.dtype} / {value_states.dtype}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def page_count(self, length: int) -> int:
        """Pages holding ``length`` tokens of a layer, where every layer has the same ``page_tokens``
        (ValueError otherwise: ``cache.layers[i].geometry.page_count(length)``)."""
        return -(-length // self.page_tokens)

    # ------------------------------------------------------------------ pages: addressing

    def _page(self, seq: _SequencePages, index: int) -> Page:
        return seq.owners[index].pages[index % seq.geometry.segment_pages]

    def _ranges(self, seq: _SequencePages, pages: Iterable[int]) -> Iterator[tuple[Allocation, int, int, int]]:
        """``(allocation, start, stop, first logical page)`` for runs of consecutive ``pages`` (sorted)
        in one segment held by one allocation."""
        owners = seq.owners
        segment_pages = seq.geometry.segment_pages
        run_start = previous = None
        for page in pages:
            if (previous is not None and page == previous + 1 and page % segment_pages != 0
                    and owners[page] is owners[previous]):  # fmt: skip
                previous = page
                continue
            if run_start is not None:
                yield self._range(seq, run_start, previous + 1)
            run_start = previous = page
        if run_start is not None:
            yield self._range(seq, run_start, previous + 1)

    def _range(self, seq: _SequencePages, start: int, stop: int) -> tuple[Allocation, int, int, int]:
        """Logical pages ``[start, stop)``, which one allocation holds, as ``(allocation, start, stop, start)``."""
        offset = start % seq.geometry.segment_pages
        return seq.owners[start], offset, offset + stop - start, start

    # ------------------------------------------------------------------ pages: sharing

    def _hold(self, allocation: Allocation) -> None:
        self._holds[allocation] = self._holds.get(allocation, 0) + 1

    def _drop_holds(self, allocations: Iterable[Allocation]) -> None:
        """One reference less to each of ``allocations``; those left with none are freed."""
        for allocation in allocations:
            left = self._holds[allocation] - 1
            if left:
                self._holds[allocation] = left
                continue
            del self._holds[allocation]
            if not allocation.freed:
                self.pager.free(allocation)
            self._allocations.remove(allocation)
            self._pending_stream = [entry for entry in self._pending_stream if entry[0] is not allocation]

    def _refer(self, seq: _SequencePages, pages: Iterable[int]) -> None:
        """``seq`` now refers to its logical ``pages`` (in ``seq.owners``)."""
        segment_pages = seq.geometry.segment_pages
        for p in pages:
            key = (seq.owners[p], p % segment_pages)
            self._page_refs[key] = self._page_refs.get(key, 0) + 1
            self._hold(key[0])

    def _unrefer(self, seq: _SequencePages, first: int) -> None:
        """``seq`` stops referring to its logical pages from ``first`` on (``seq.owners`` is cut there):
        pages no sequence refers to any more are discarded, allocations nothing holds are freed.
        Pins of ``seq`` on them must be released first."""
        segment_pages = seq.geometry.segment_pages
        dropped = seq.owners[first:]
        del seq.owners[first:]
        unused: dict[Allocation, list[int]] = {}
        dropped_from: dict[Allocation, int] = {}
        for p, allocation in enumerate(dropped, start=first):
            dropped_from[allocation] = dropped_from.get(allocation, 0) + 1
            key = (allocation, p % segment_pages)
            left = self._page_refs[key] - 1
            if left:
                self._page_refs[key] = left
            else:
                del self._page_refs[key]
                unused.setdefault(allocation, []).append(key[1])
        for allocation, indices in unused.items():
            if self._holds[allocation] > dropped_from[allocation]:  # it stays: drop the pages' bytes
                for start, stop in _index_runs(sorted(indices)):
                    self.pager.discard(allocation, start, stop)
        self._drop_holds(dropped)

    def _writable_page(self, layer: PagedLayer, seq: _SequencePages, index: int) -> None:
        """Make logical page ``index`` of ``seq`` (its next page, or one it holds) a page only ``seq``
        refers to: a page shared with another sequence is copied first (copy-on-write); a new page
        goes to the sequence's segment for it, or to a new segment when another sequence uses that place."""
        segment_pages = seq.geometry.segment_pages
        k, offset = divmod(index, segment_pages)
        shared = index < len(seq.owners)
        if shared and self._page_refs[(seq.owners[index], offset)] == 1:
            return  # only seq refers to it: written in place
        while len(seq.segments) <= k:
            seq.segments.append(None)
        target = seq.segments[k]
        if target is None or (target, offset) in self._page_refs:
            if target is not None:
                seq.segments[k] = None
                self._drop_holds([target])
            target = self.pager.allocate(segment_pages * self.pager.page_size, name=f"kv.layer{layer.layer_idx}.seg{k}")
            self._allocations.append(target)
            self._hold(target)
            seq.segments[k] = target
        if not shared:
            seq.owners.append(target)
            self._refer(seq, [index])
            return
        source = seq.owners[index]
        self._make_room(layer.layer_idx, 2)
        with self.pager.ensure_resident(source, offset, offset + 1) as read:
            write = self.pager.ensure_resident(target, offset, offset + 1, discard=[offset])
            try:
                read.wait()
                write.wait()
                write.views()[0].copy_(read.views()[0])
            finally:
                write.release(dirty=True)
        self.pages_copied += 1
        pin = seq.hot.pop(index, None)
        if pin is not None:  # it pinned the shared page
            self._hot_pins.pop(id(pin), None)
            pin.release()
        self._unrefer_one(seq, index, target)

    def _unrefer_one(self, seq: _SequencePages, index: int, target: Allocation) -> None:
        """Logical page ``index`` of ``seq`` moves from the shared page it referred to to ``target``'s."""
        key = (seq.owners[index], index % seq.geometry.segment_pages)
        self._page_refs[key] -= 1  # still referred to by another sequence: nothing to free
        self._drop_holds([key[0]])
        seq.owners[index] = target
        self._refer(seq, [index])

    def page_kv(self, view: torch.Tensor, geometry: LayerGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """A page's uint8 view as its keys ``[page_tokens, kv_heads, head_dim]`` and values
        ``[page_tokens, kv_heads, value_dim]``, of a layer of ``geometry``."""
        elements = view.view(self.dtype)
        key_elements = geometry.page_tokens * geometry.kv_heads * geometry.head_dim
        value_elements = geometry.page_tokens * geometry.kv_heads * geometry.value_dim
        keys = elements[:key_elements].view(geometry.page_tokens, geometry.kv_heads, geometry.head_dim)
        values = elements[key_elements : key_elements + value_elements].view(geometry.page_tokens, geometry.kv_heads, geometry.value_dim)
        return keys, values

    def key_pools(self, slab: int, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Device slab ``slab`` as the kernels' key and value page pools ``[slots, page_tokens, kv_heads, head_dim]``
        of layer ``layer_idx``'s geometry (layers of one geometry share the views). The kernels take
        keys and values of one head size: ValueError for a layer whose values have another."""
        geometry = self.layers[layer_idx].geometry
        if geometry.value_dim != geometry.head_dim:
            raise ValueError(
                f"layer {layer_idx}: its values have head size {geometry.value_dim} and its keys {geometry.head_dim}; "
                f"the paged kernels take keys and values of one size"
            )
        tensor = self.pager.device_tier.slabs[slab]
        cached = self._pools.get((slab, geometry))
        if cached is not None and cached[0] is tensor:
            return cached[1], cached[2]
        page_elements = self.pager.page_size // self.dtype.itemsize
        flat = tensor.view(self.dtype)
        slots = tensor.numel() // self.pager.page_size
        token_elements = geometry.kv_heads * geometry.head_dim
        shape = (slots, geometry.page_tokens, geometry.kv_heads, geometry.head_dim)
        strides = (page_elements, token_elements, geometry.head_dim, 1)
        keys = flat.as_strided(shape, strides, flat.storage_offset())
        values = flat.as_strided(shape, strides, flat.storage_offset() + geometry.page_tokens * token_elements)
        self._pools[(slab, geometry)] = (tensor, keys, values)
        return keys, values

    def slot_location(self, slot: int) -> tuple[int, int]:
        """``(slab, slot within the slab)`` of a device slot."""
        return divmod(slot, self.pager.device_tier.slab_pages)

    # ------------------------------------------------------------------ writes

    def _take_valid(self, layer: PagedLayer, q_len: int) -> list[int]:
        """Real tokens per sequence among the next ``q_len`` of this forward (the pads of a chunk come first)."""
        start = layer.cursor
        layer.cursor += q_len
        if self._forward_pads is None:
            return [q_len] * len(layer.seqs)
        if len(self._forward_pads) != len(layer.seqs):
            raise ValueError(f"the attention mask has {len(self._forward_pads)} rows but the batch has {len(layer.seqs)}")
        counts = []
        for b, pads in enumerate(self._forward_pads):
            pads_here = min(q_len, max(0, pads - start))
            if pads_here and layer.seqs[b].length:
                raise ValueError("PagedKVCache supports left padding only: a masked token follows real tokens")
            counts.append(q_len - pads_here)
        return counts

    def _write_tokens(self, layer: PagedLayer, seq: _SequencePages, keys: torch.Tensor, values: torch.Tensor, offset: int, count: int) -> None:
        """Write ``keys[:, offset:offset+count]`` (``[kv_heads, q_len, head_dim]``) and values after the stored tokens."""
        geometry = seq.geometry
        pt = geometry.page_tokens
        start, end = seq.length, seq.length + count
        first, stop = start // pt, geometry.page_count(end)
        for index in range(first, stop):
            self._writable_page(layer, seq, index)
        for group_start in range(first, stop, self.group_pages):
            group = range(group_start, min(stop, group_start + self.group_pages))
            missing = sum(1 for index in group if self._page(seq, index).device_slot is None)
            self._make_room(layer.layer_idx, missing)
            for allocation, lo, hi, logical in self._ranges(seq, group):
                fresh = [lo + i for i in range(hi - lo) if (logical + i) * pt >= start]
                resident = self.pager.ensure_resident(allocation, lo, hi, discard=fresh)
                try:
                    resident.wait()
                    for i, view in enumerate(resident.views()):
                        page_start = (logical + i) * pt
                        t0, t1 = max(start, page_start), min(end, page_start + pt)
                        page_keys, page_values = self.page_kv(view, geometry)
                        source = offset + t0 - start
                        page_keys[t0 - page_start : t1 - page_start].copy_(keys[:, source : source + t1 - t0].transpose(0, 1))
                        page_values[t0 - page_start : t1 - page_start].copy_(values[:, source : source + t1 - t0].transpose(0, 1))
                finally:
                    resident.release(dirty=True)
        seq.length = end
        self._update_hot(seq)

    def _update_hot(self, seq: _SequencePages) -> None:
        """Pin the sink pages and the newest page of ``seq``; unpin the page that stopped being newest."""
        if not self.hot_enabled or seq.length == 0:
            return
        pages = seq.geometry.page_count(seq.length)
        wanted = set(range(min(self.sink_pages, pages))) | {pages - 1}
        for index in sorted(index for index in seq.hot if index not in wanted or seq.hot[index].allocation is not seq.owners[index]):
            pin = seq.hot.pop(index)
            self._hot_pins.pop(id(pin), None)
            pin.release()
        for index in sorted(wanted - set(seq.hot)):
            allocation, lo, hi, _ = self._range(seq, index, index + 1)
            pin = self.pager.ensure_resident(allocation, lo, hi)
            seq.hot[index] = pin
            self._hot_pins[id(pin)] = pin

    # ------------------------------------------------------------------ room on the device

    def _make_room(self, layer_idx: int, needed: int) -> None:
        """Evict pages until ``needed`` device slots are free, from the layer used furthest in the future.

        For the cyclic layer order of decoding that is the layer just computed (``layer_idx - 1``),
        then the one before, ... and the current layer last. Pinned pages stay. Nothing without
        ``makes_room`` (the pager's policy makes room).
        """
        if not self.makes_room:
            return
        tier = self.pager.device_tier
        short = min(needed, tier.capacity_pages) - tier.free_pages
        if short <= 0:
            return
        self._evict_pending()
        short = min(needed, tier.capacity_pages) - tier.free_pages
        count = len(self.layers)
        for step in range(1, count + 1):
            layer = self.layers[(layer_idx - step) % count]
            for seq in layer.seqs:
                for allocation in dict.fromkeys(seq.owners):
                    pages = allocation.pages
                    index = 0
                    while index < len(pages) and short > 0:
                        if pages[index].device_slot is None or pages[index].pin_count:
                            index += 1
                            continue
                        stop = index
                        while (stop < len(pages) and stop - index < short and pages[stop].device_slot is not None
                               and pages[stop].pin_count == 0):
                            stop += 1
                        short -= self.pager.evict(allocation, index, stop)
                        index = stop
                    if short <= 0:
                        return

    def _keep_window(self, layer_idx: int) -> None:
        """Keep two streaming groups of slots free, counting the last streamed group (it leaves when the
        next group arrives: evicting it now would make the next copy wait for the kernel reading it)."""
        pending = sum(hi - lo for _, lo, hi in self._pending_stream)
        self._make_room(layer_idx, self.window_pages - pending)

    def _evict_pending(self) -> None:
        pending, self._pending_stream = self._pending_stream, []
        for allocation, lo, hi in pending:
            if not allocation.freed:
                self.pager.evict(allocation, lo, hi)

    # ------------------------------------------------------------------ reads: dense

    @deferring
    def dense_kv(self, layer_idx: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys ``[batch, kv_heads, total - start, head_dim]`` and values ``[..., value_dim]``
        of positions ``[start, total)``; sequence ``b`` fills the last ``length[b]`` positions (its
        pads, first, are zeros). Pages holding no position from ``start`` on are not read."""
        self._refuse_closed()
        layer = self.layers[layer_idx]
        geometry = layer.geometry
        if geometry is None:  # its shapes come with its first update
            raise ValueError(f"PagedKVCache.dense_kv: layer {layer_idx} holds no keys and values yet (no update since "
                             f"the cache was made or reset)")  # fmt: skip
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"PagedKVCache.dense_kv: start: expected an int, got {start!r}")
        if not 0 <= start <= layer.total:
            raise ValueError(f"PagedKVCache.dense_kv: start={start} is outside the layer's positions [0, {layer.total}]")
        shape = (len(layer.seqs), geometry.kv_heads, layer.total - start)
        keys = torch.zeros((*shape, geometry.head_dim), dtype=self.dtype, device=self.device)
        values = torch.zeros((*shape, geometry.value_dim), dtype=self.dtype, device=self.device)
        pt = geometry.page_tokens
        for b, seq in enumerate(layer.seqs):
            pad = layer.total - seq.length
            first_token = max(start - pad, 0)  # the sequence's first token at or past ``start``
            pages = geometry.page_count(seq.length)
            for group_start in range(first_token // pt, pages, self.group_pages):
                group = range(group_start, min(pages, group_start + self.group_pages))
                for allocation, lo, hi, logical in self._ranges(seq, group):
                    with self.pager.ensure_resident(allocation, lo, hi) as resident:
                        resident.wait()
                        for i, view in enumerate(resident.views()):
                            t0 = max((logical + i) * pt, first_token)
                            t1 = min(seq.length, (logical + i + 1) * pt)
                            if t1 <= t0:
                                continue
                            page_keys, page_values = self.page_kv(view, geometry)
                            skip = t0 - (logical + i) * pt
                            keys[b, :, pad + t0 - start : pad + t1 - start] = page_keys[skip : skip + t1 - t0].transpose(0, 1)
                            values[b, :, pad + t0 - start : pad + t1 - start] = page_values[skip : skip + t1 - t0].transpose(0, 1)
        return keys, values

    def dense_mask(self, layer_idx: int, q_len: int, sliding_window: Optional[int] = None) -> torch.Tensor:
        """Boolean ``[batch, 1, q_len, total]`` mask for :meth:`dense_kv` and the last ``q_len`` queries:
        causal, pads hidden, and (with ``sliding_window``) keys at most ``window - 1`` positions back."""
        layer = self.layers[layer_idx]
        total = layer.total
        key_pos = torch.arange(total, device=self.device)
        query_pos = torch.arange(total - q_len, total, device=self.device)
        visible = key_pos[None, :] <= query_pos[:, None]
        if sliding_window is not None:
            visible &= key_pos[None, :] > query_pos[:, None] - sliding_window
        starts = torch.tensor([total - seq.length for seq in layer.seqs], device=self.device)
        mask = visible[None] & (key_pos[None, None, :] >= starts[:, None, None])
        return mask[:, None]

    # ------------------------------------------------------------------ reads: pieces for the paged kernels

    def is_decode(self, layer_idx: int) -> bool:
        """Whether the last update of the layer added exactly one real token to every sequence."""
        layer = self.layers[layer_idx]
        return layer.last_q_len == 1 and all(seq.length == before + 1 for seq, before in zip(layer.seqs, layer.len_before))

    def key_pieces(self, layer_idx: int) -> Iterator[KeyPiece]:
        """The layer's pages as kernel calls, pinned while the caller enqueues each call.

        Decode (one new token per sequence): every page is visible; the newest (partial) page comes
        last in its row. Prefill of a chunk: pages wholly before the chunk are visible to every
        query; the pages from the one holding the chunk's first token on are read causally.
        Resident pages come first (one call per slab), then the missing pages, streamed in groups of
        ``group_pages``; each streamed group is evicted once the next one holds its slots.
        """
        layer = self.layers[layer_idx]
        geometry = layer.geometry
        pt = geometry.page_tokens
        decode = self.is_decode(layer_idx)
        batch = len(layer.seqs)
        lengths = [seq.length for seq in layer.seqs]
        q_len = layer.last_q_len
        # per sequence: far pages (every key visible) and the first near page (causal from there)
        near_first = [geometry.page_count(lengths[b]) if decode else layer.len_before[b] // pt for b in range(batch)]
        ends = [geometry.page_count(length) for length in lengths]

        fast = self._single_resident_slab(layer, ends)
        if fast is not None:
            slab, tables, pins = fast
            try:
                if decode:
                    yield KeyPiece(slab, tables, lengths)
                else:
                    yield KeyPiece(slab, tables, lengths, [length - q_len for length in lengths])
            finally:
                for pin in pins:
                    pin.release()
            return

        # Phase A: resident pages, pinned (all hits), one call per slab (and per causal run).
        far_missing: list[list[int]] = [[] for _ in range(batch)]
        near_missing: list[list[int]] = [[] for _ in range(batch)]
        pins: list[ResidentPages] = []
        far_rows: dict[int, list[list[int]]] = {}
        far_lens: dict[int, list[int]] = {}
        near_runs: list[list[tuple[int, int, list[int]]]] = [[] for _ in range(batch)]  # (slab, first page, slots)
        try:
            for b, seq in enumerate(layer.seqs):
                resident = [p for p in range(ends[b]) if self._page(seq, p).device_slot is not None]
                resident_set = set(resident)
                for p in range(ends[b]):
                    if p not in resident_set:
                        (far_missing if p < near_first[b] else near_missing)[b].append(p)
                for allocation, lo, hi, _ in self._ranges(seq, resident):
                    pins.append(self.pager.ensure_resident(allocation, lo, hi))
                tail = None
                for p in resident:
                    slab, local = self.slot_location(self._page(seq, p).device_slot)
                    if p < near_first[b]:
                        tokens = min(pt, lengths[b] - p * pt)
                        if tokens < pt:
                            tail = (slab, local, tokens)
                            continue
                        far_rows.setdefault(slab, [[] for _ in range(batch)])[b].append(local)
                        far_lens.setdefault(slab, [0] * batch)[b] += pt
                    else:
                        runs = near_runs[b]
                        if runs and runs[-1][0] == slab and runs[-1][1] + len(runs[-1][2]) == p:
                            runs[-1][2].append(local)
                        else:
                            runs.append((slab, p, [local]))
                if tail is not None:
                    slab, local, tokens = tail
                    far_rows.setdefault(slab, [[] for _ in range(batch)])[b].append(local)
                    far_lens.setdefault(slab, [0] * batch)[b] += tokens
            for pin in pins:
                pin.wait()
            for slab in sorted(far_rows):
                yield KeyPiece(slab, far_rows[slab], far_lens[slab])
            yield from self._causal_pieces(near_runs, lengths, q_len, pt)
        finally:
            for pin in pins:
                pin.release()

        # Phase B: missing pages, streamed a group at a time.
        if any(far_missing) or any(near_missing):
            self._keep_window(layer_idx)
        for b, seq in enumerate(layer.seqs):
            for pages, causal in ((far_missing[b], False), (near_missing[b], True)):
                for group_start in range(0, len(pages), self.group_pages):
                    group = pages[group_start : group_start + self.group_pages]
                    yield from self._streamed_pieces(layer, b, group, causal, lengths, q_len)

    def _single_resident_slab(self, layer: PagedLayer, ends: list[int]):
        """Slab, logical block tables and pins when every page of the layer is resident in one slab."""
        slab_pages = self.pager.device_tier.slab_pages
        slabs: set[int] = set()
        for seq, end in zip(layer.seqs, ends):
            for p in range(end):
                slot = self._page(seq, p).device_slot
                if slot is None:
                    return None
                slabs.add(slot // slab_pages)
        if len(slabs) > 1 or not (slabs or self.pager.device_tier.slabs):
            return None
        pins: list[ResidentPages] = []
        rows: list[list[int]] = []
        try:
            for seq, end in zip(layer.seqs, ends):
                row: list[int] = []
                for allocation, lo, hi, _ in self._ranges(seq, range(end)):
                    pin = self.pager.ensure_resident(allocation, lo, hi)
                    pins.append(pin)
                    row += pin.slots
                rows.append(row)
        except BaseException:
            for pin in pins:
                pin.release()
            raise
        # The tables come from the pinned slots: a page evicted since the check above (by the weight
        # prefetch's thread) was faulted back in by ensure_resident, perhaps into another slab.
        slab = slabs.pop() if slabs else 0
        base = slab * slab_pages
        if any(row and (min(row) < base or max(row) >= base + slab_pages) for row in rows):
            for pin in pins:
                pin.release()
            return None
        tables = [[slot - base for slot in row] for row in rows]
        for pin in pins:
            pin.wait()
        return slab, tables, pins

    def _causal_pieces(self, runs: list[list[tuple[int, int, list[int]]]], lengths: list[int], q_len: int, pt: int) -> Iterator[KeyPiece]:
        """Causal calls over runs of consecutive pages of ``pt`` tokens: call ``i`` takes the ``i``-th run of every sequence."""
        batch = len(runs)
        for i in range(max((len(r) for r in runs), default=0)):
            by_slab: dict[int, KeyPiece] = {}
            for b in range(batch):
                if i >= len(runs[b]):
                    continue
                slab, first, slots = runs[b][i]
                piece = by_slab.get(slab)
                if piece is None:
                    piece = by_slab[slab] = KeyPiece(slab, [[] for _ in range(batch)], [0] * batch, [0] * batch)
                piece.block_table[b] = slots
                piece.seq_lens[b] = min(lengths[b], (first + len(slots)) * pt) - first * pt
                piece.q_start[b] = lengths[b] - q_len - first * pt
            for slab in sorted(by_slab):
                yield by_slab[slab]

    def _streamed_pieces(self, layer: PagedLayer, b: int, group: list[int], causal: bool, lengths: list[int], q_len: int) -> Iterator[KeyPiece]:
        seq = layer.seqs[b]
        batch = len(layer.seqs)
        pt = layer.geometry.page_tokens
        pins: list[ResidentPages] = []
        ranges = list(self._ranges(seq, group))
        try:
            for allocation, lo, hi, _ in ranges:
                pins.append(self.pager.ensure_resident(allocation, lo, hi))
            # The previous group leaves only now, so this one took other slots (ping-pong).
            self._evict_pending()
            for pin in pins:
                pin.wait()
            if causal:
                runs: list[tuple[int, int, list[int]]] = []
                for p in group:
                    slab, local = self.slot_location(self._page(seq, p).device_slot)
                    if runs and runs[-1][0] == slab and runs[-1][1] + len(runs[-1][2]) == p:
                        runs[-1][2].append(local)
                    else:
                        runs.append((slab, p, [local]))
                per_seq = [[] for _ in range(batch)]
                for run in runs:
                    per_seq[b] = [run]
                    yield from self._causal_pieces(per_seq, lengths, q_len, pt)
            else:
                rows: dict[int, list[int]] = {}
                tokens: dict[int, int] = {}
                tail = None
                for p in group:
                    slab, local = self.slot_location(self._page(seq, p).device_slot)
                    count = min(pt, lengths[b] - p * pt)
                    if count < pt:
                        tail = (slab, local, count)
                        continue
                    rows.setdefault(slab, []).append(local)
                    tokens[slab] = tokens.get(slab, 0) + count
                if tail is not None:
                    rows.setdefault(tail[0], []).append(tail[1])
                    tokens[tail[0]] = tokens.get(tail[0], 0) + tail[2]
                for slab in sorted(rows):
                    table = [[] for _ in range(batch)]
                    lens = [0] * batch
                    table[b], lens[b] = rows[slab], tokens[slab]
                    yield KeyPiece(slab, table, lens)
        finally:
            for pin in pins:
                pin.release()
            if self.makes_room:
                self._pending_stream.extend((allocation, lo, hi) for allocation, lo, hi, _ in ranges)

    # ------------------------------------------------------------------ batch edits, freeing

    @deferring
    def _free_layer(self, layer: PagedLayer) -> None:
        for seq in layer.seqs:
            self._free_sequence(seq)
        layer.seqs = [_SequencePages(layer.geometry) for _ in layer.seqs]
        layer.total = 0
        layer.cursor = 0
        layer.len_before = []
        layer.last_q_len = 0

    def _free_sequence(self, seq: _SequencePages) -> None:
        for pin in seq.hot.values():
            self._hot_pins.pop(id(pin), None)
            if not pin.released:  # (close() released every pin)
                pin.release()
        seq.hot.clear()
        if self.closed:  # close() freed every allocation
            seq.owners, seq.segments = [], []
        else:
            self._unrefer(seq, 0)
            self._drop_holds([allocation for allocation in seq.segments if allocation is not None])
            seq.segments = []
        seq.length = 0

    def _refuse_closed(self) -> None:
        """Raise where the cache is closed (its pages are freed: an update or a batch edit has none to use)."""
        if self.closed:
            raise RuntimeError("this PagedKVCache is closed")

    @deferring
    def _crop_layer(self, layer: PagedLayer, tokens_to_remove: int) -> None:
        try:
            count = operator.index(tokens_to_remove)  # any integer, a NumPy one too
        except TypeError:
            count = None
        if isinstance(tokens_to_remove, bool) or count is None:
            raise TypeError(f"crop: expected an int (minus the number of tokens to remove), got {tokens_to_remove!r}")
        if count > 0:
            raise ValueError(f"crop: pass a negative number of tokens to remove, got {tokens_to_remove}")
        self._refuse_closed()
        remove = min(-count, layer.total)
        if remove == 0:
            return
        for seq in layer.seqs:
            self._cut_sequence(seq, max(0, seq.length - remove))
        layer.total -= remove

    def _cut_sequence(self, seq: _SequencePages, length: int) -> None:
        """``seq`` keeps its first ``length`` tokens: its pins and pages past them go (the partial
        page stays), and a sequence that held pins pins its newest page again."""
        pinned = bool(seq.hot)  # a cache between forwards holds no pins: a cut there takes none
        seq.length = length
        for index in [index for index in seq.hot if index >= seq.geometry.page_count(seq.length)]:
            pin = seq.hot.pop(index)
            self._hot_pins.pop(id(pin), None)
            pin.release()
        self._unrefer(seq, seq.geometry.page_count(seq.length))
        if pinned:
            self._update_hot(seq)

    @deferring
    def _reorder_layer(self, layer: PagedLayer, beam_idx: torch.LongTensor) -> None:
        """Sequence ``b`` becomes sequence ``beam_idx[b]``, as ``DynamicCache.reorder_cache`` does (beam
        search): a sequence kept once keeps its pages, one kept more than once shares them with its
        copies (:meth:`_share_sequence`; a shared page is copied only when written), one not kept is freed."""
        self._refuse_closed()
        if not layer.is_initialized:
            return  # a layer no forward updates (one reusing another's keys and values), as DynamicCache's
        order = _batch_positions(beam_idx, len(layer.seqs), "reorder_cache: beam_idx")
        if order == list(range(len(layer.seqs))) or layer.total == 0:
            return
        self._rebuild_batch(layer, order)

    @deferring
    def _repeat_layer(self, layer: PagedLayer, repeats: int) -> None:
        """Each sequence ``repeats`` times in a row (``DynamicCache.batch_repeat_interleave``); the
        copies share its pages until they write them."""
        try:
            count = operator.index(repeats)  # any integer, a NumPy one too, as DynamicCache takes
        except TypeError:
            count = None
        if isinstance(repeats, bool) or count is None or count < 1:
            raise ValueError(f"batch_repeat_interleave: repeats must be a positive int, got {repeats!r}")
        self._refuse_closed()
        if count != 1 and layer.is_initialized and layer.total:  # an empty layer stays, as DynamicCache's
            self._rebuild_batch(layer, [b for b in range(len(layer.seqs)) for _ in range(count)])

    @deferring
    def _rebuild_batch(self, layer: PagedLayer, order: list[int]) -> None:
        """The layer's sequences become ``[seqs[i] for i in order]``: the first use of a sequence takes
        it, each further use a copy sharing its pages; the sequences not used are freed first."""
        for b, seq in enumerate(layer.seqs):
            if b not in order:
                self._free_sequence(seq)
        self._size_hot_pins(len(order))
        taken: set[int] = set()
        seqs: list[_SequencePages] = []
        for i in order:
            seqs.append(layer.seqs[i] if i not in taken else self._share_sequence(layer.seqs[i]))
            taken.add(i)
        layer.seqs = seqs
        self.batch_size_ = len(seqs)
        self._forward_pads = None  # the last forward's padding was of the batch before

    def _share_sequence(self, seq: _SequencePages) -> _SequencePages:
        """A copy of ``seq`` referring to its pages (no bytes move), pinned as ``seq`` is; whichever of
        the two writes a shared page first gets a copy of it (:meth:`_writable_page`)."""
        copy = _SequencePages(seq.geometry)
        copy.owners = list(seq.owners)
        self._refer(copy, range(len(copy.owners)))
        copy.length = seq.length
        if seq.hot:  # pinned as its source (a cache between forwards holds no pins)
            self._update_hot(copy)
        return copy

    def _select_layer(self, layer: PagedLayer, indices: torch.Tensor) -> None:
        """Keep the sequences at ``indices`` (positions, or a boolean mask over the batch, as
        ``DynamicCache`` takes them), in that order; an empty layer stays, as DynamicCache's."""
        self._refuse_closed()
        if not layer.is_initialized or layer.total == 0:
            return
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            if indices.numel() != len(layer.seqs):
                raise ValueError(f"batch_select_indices: a boolean mask of {indices.numel()} for a batch of {len(layer.seqs)}")
            indices = indices.nonzero().reshape(-1)
        self._rebuild_batch(layer, _batch_positions(indices, len(layer.seqs), "batch_select_indices: indices"))

    # ------------------------------------------------------------------ inspection

    def stats(self) -> dict:
        """The pager's counters plus this cache's pages per tier and its geometry."""
        tiers = {"device": 0, "host": 0, "disk": 0, "unwritten": 0}
        for allocation in self._allocations:
            for page in allocation.pages:
                tiers[page.tier or "unwritten"] += 1
        stats = self.pager.stats()
        stats["kv_pages"] = tiers
        stats["page_tokens"] = self._per_layer("page_tokens")  # an int, or a list per layer where layers differ
        stats["stream_group_pages"] = self.group_pages
        stats["hot_pins"] = len(self._hot_pins)
        stats["kv_pages_copied"] = self.pages_copied
        stats["kv_pages_shared"] = sum(1 for refs in self._page_refs.values() if refs > 1)
        return stats

    def __repr__(self) -> str:
        tokens = self.layers[0].total if self.layers else 0
        return (
            f"PagedKVCache(layers={len(self.layers)}, batch={self.batch_size_}, tokens={tokens}, "
            f"page_tokens={self._per_layer('page_tokens')}, pager={self.pager.config.device})"
        )


def _batch_positions(indices: torch.Tensor, batch: int, what: str) -> list[int]:
    """``indices`` (a tensor or sequence of ints, negative ones counted from the end, as tensor
    indexing takes them) as positions in a batch of ``batch``; IndexError naming ``what`` for positions
    that are not integers, not a vector (as ``index_select`` refuses them in DynamicCache) or outside the batch."""
    indices = torch.as_tensor(indices)
    if indices.dtype == torch.bool or indices.dtype.is_floating_point or indices.dtype.is_complex:
        raise IndexError(f"{what}: expected integer positions (int64 or int32), got dtype {indices.dtype}")
    if indices.dim() > 1:
        raise IndexError(f"{what}: expected a vector of positions, got shape {tuple(indices.shape)}")
    positions = [int(i) for i in indices.reshape(-1).tolist()]
    if any(not -batch <= i < batch for i in positions):
        raise IndexError(f"{what} {positions} name sequences outside the batch of {batch}")
    return [i % batch for i in positions]


def _index_runs(indices: list[int]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the runs of consecutive numbers in sorted ``indices``."""
    start = previous = None
    for index in indices:
        if previous is not None and index == previous + 1:
            previous = index
            continue
        if start is not None:
            yield start, previous + 1
        start = previous = index
    if start is not None:
        yield start, previous + 1


def streaming_config(config: MemoryConfig) -> MemoryConfig:
    """``config`` with the pager's own prefetching off (the KV cache schedules its transfers)."""
    if config.prefetch_strategy == "none":
        return config
    return dataclasses.replace(config, prefetch_strategy="none")


def _refuse_fake_run(*tensors: Optional[torch.Tensor]) -> None:
    """Raise for a forward under ``FakeTensorMode`` (shape, flop or memory estimation) or with fake
    keys and values: the cache keeps real pages, and would count tokens whose keys and values it never
    stores (zeros read back by every later forward), or raise reading a fake mask. A DynamicCache
    holds the fake tensors themselves."""
    fake = sys.modules.get("torch._subclasses.fake_tensor")  # imported by anyone who made a fake tensor
    if fake is None:
        return
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None or any(
        isinstance(tensor, fake.FakeTensor) for tensor in tensors
    ):
        raise RuntimeError(
            "PagedKVCache: a forward under FakeTensorMode (or with fake keys and values): the cache keeps real pages "
            "and would record tokens it never stores. Estimate with past_key_values=DynamicCache() or use_cache=False"
        )


@deferring  # a Ctrl-C as it starts (close() at generate's end) is raised once every page is freed
def _release_pages(pager: Pager, allocations: list[Allocation], hot_pins: dict[int, ResidentPages], owns_pager: bool) -> None:
    """Finalizer of a cache: unpin and free its pages (it must not reference the cache). Run by a
    garbage collection inside one of this thread's pager calls, the release and frees wait for the
    pager's next call (:meth:`Pager.release_and_free_when_unlocked`), and a pager of its own is
    left to its own finalizer."""
    if pager.closed:
        return
    try:
        pager.release_and_free_when_unlocked(list(hot_pins.values()), [allocation for allocation in allocations if not allocation.freed])
        hot_pins.clear()
        allocations.clear()
    finally:
        if owns_pager and not pager._inside_a_call():
            pager.close()
