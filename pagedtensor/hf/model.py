"""Paging for Hugging Face causal LMs: :func:`enable_paging` and :class:`PagedModel`.

``enable_paging(model, MemoryConfig(...))`` returns the same model, changed in place:

* ``model.generate(...)`` fills a fresh :class:`~pagedtensor.hf.cache.PagedKVCache` on the model's
  pager unless the call brings its own cache (or asks for a ``cache_implementation``, ``"hybrid"``
  aside, or ``use_cache=False``); beam search too, its beams sharing pages copy-on-write, and
  assisted decoding. The cache's pages are freed when ``generate`` returns, unless the output
  carries the cache.
* the model attends with ``"pagedllm"`` (Triton kernels on the pages) when the pager's device is a
  GPU or the Triton interpreter is on; otherwise it keeps its attention and the cache hands it
  dense keys and values read from the pages (exact, slower).
* a forward pre-hook tells the cache the padding of each forward (from the 2D attention mask). A
  forward outside ``generate`` (``model(ids, cache=PagedKVCache(...))``) leaves its cache with no
  pinned pages; ``generate`` keeps them pinned from step to step and unpins them when it returns.
* threads: each thread may run forwards and ``generate`` calls of the model at once, each with its own
  cache (the per-call state is per thread, :class:`CallState`); one cache used by two threads at once
  raises ``RuntimeError`` (:meth:`~pagedtensor.hf.cache.PagedKVCache.claim`).
* chunked prefill: with ``"pagedllm"``, a decoder layer given more than ``prefill_chunk_size``
  tokens runs them chunk by chunk (all chunks of layer 0, then of layer 1, ...), so activations stay
  bounded and each chunk attends to the layer's pages, which stay resident while the layer runs; the
  final norm runs in chunks too. Only the positions ``generate`` needs get logits (it passes
  ``logits_to_keep=1``).
* ``page_weights=True``: the parameters of every decoder layer become
  :class:`~pagedtensor.tensor.PagedTensor` parameters on the same pager as the KV cache, so weights
  and KV pages compete for one budget under one eviction policy; a forward pre-hook on layer ``i``
  prefetches layer ``i + 1``'s weights (layer 0's after the last layer, for the next token) but
  its experts' stacks (:func:`routed_expert_stack`: a token reads only the experts it is routed to,
  which fault in at the op, :func:`~pagedtensor.handlers.grouped_mm.grouped_mm_of_routed_experts`); each
  ``nn.Linear`` reads its paged weight through :func:`~pagedtensor.handlers.linear.paged_linear` (transformers'
  ``Conv1D``, GPT-2's, through :func:`~pagedtensor.handlers.linear.paged_conv1d`), and the
  KV cache leaves room-making to the pager's policy (``PagedKVCache(makes_room=False)``).

Works with transformers 5.17 (``past_key_values=``) through 5.25 (``cache=``): the keyword is read
from the model's ``forward`` signature.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import threading
import time
import types
import weakref
from typing import Any, Iterator, Optional

import torch

from pagedtensor.config import MemoryConfig, SizeLike, check_memory_config, format_size, normalize_device
from pagedtensor.handlers.linear import paged_conv1d, paged_linear
from pagedtensor.hf.attention import MASKED_WINDOWS, PAGED_FORWARD, register_attention
from pagedtensor.hf.cache import ACTIVE_UPDATE, ATTENTION_NAME, DEFAULT_STREAM_GROUP_BYTES, PagedKVCache, check_cache_settings, streaming_config
from pagedtensor.errors import DeviceTierFullError, OutOfPagesError, SlabAllocationError
from pagedtensor.pager import Allocation, Pager
from pagedtensor.tensor import run_outside_compile

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 2048
STATE_ATTRIBUTE = "_pagedllm"


class CallState(threading.local):
    """What the forward or ``generate`` running on this thread may do with a paged model: set by the
    forward pre-hook and the ``generate`` wrapper, reset after them. One per thread, so that threads
    may each run forwards and generates of one model at once, each with its own cache (a cache used
    by two threads at once is refused: :meth:`PagedKVCache.claim`)."""

    def __init__(self) -> None:
        self.in_place = False  # this forward may overwrite layer inputs (no grad, no captured hidden states)
        self.chunked = True  # this forward may run long inputs in chunks (not when attention weights are captured: one per layer)
        self.forward_cache: Optional[weakref.ref] = None  # the PagedKVCache this forward fills
        self.claimed = False  # whether this forward claimed forward_cache for the thread (released after it)
        self.generating: Optional[PagedKVCache] = None  # the paged cache of the generate running on this thread
        self.outer: Optional[int] = None  # id of the module (the model, or its decoder called alone) whose hooks began this forward


@dataclasses.dataclass
class PagingState:
    """What :func:`enable_paging` attached to a model (``model._pagedllm``)."""

    pager: Pager
    attn_implementation: str
    prefill_chunk_size: int
    sink_pages: int
    hot_fraction: float
    stream_group_bytes: int
    cache_keyword: str
    original_generate: Any
    hooks: list = dataclasses.field(default_factory=list)
    calls: CallState = dataclasses.field(default_factory=CallState, repr=False)  # per thread
    # Modules are held by weak references: the layers' and the norm's wrapped forwards hold this state,
    # so strong ones would be reference cycles (see bound_weakly).
    # The decoder layers whose weights are paged.
    paged_layer_refs: list = dataclasses.field(default_factory=list, repr=False)
    # The modules that may see a buffer a chunked forward overwrites (the input embeddings, the decoder
    # layers and their submodules, the final norm), and how many forward hooks enable_paging itself
    # left on them: more means a user's hook may keep such a buffer.
    reused_refs: list = dataclasses.field(default_factory=list, repr=False)
    own_hooks: int = 0

    @property
    def paged_layers(self) -> list[torch.nn.Module]:
        """The decoder layers whose weights are paged (those still alive)."""
        return _alive(self.paged_layer_refs)

    @property
    def reused(self) -> list[torch.nn.Module]:
        """The modules that may see a buffer a chunked forward overwrites (those still alive)."""
        return _alive(self.reused_refs)

    @property
    def in_place(self) -> bool:
        """Whether the forward running on this thread may overwrite layer inputs."""
        return self.calls.in_place

    @property
    def chunked(self) -> bool:
        """Whether the forward running on this thread may run long inputs in chunks."""
        return self.calls.chunked

    @property
    def weight_allocations(self) -> list[list]:
        """Per paged decoder layer, the allocations of its PagedTensor parameters now (``model.to(dtype)``
        replaces them)."""
        return [_weight_allocations(layer, self.pager) for layer in self.paged_layers]

    def __deepcopy__(self, memo: dict) -> "PagingState":
        raise TypeError(
            "copy.deepcopy of a model after enable_paging: its pager (device slabs, pinned host memory, a page "
            "file) cannot be copied. Deep-copy the model before enable_paging, then enable paging on each copy"
        )

    def user_hooks(self) -> bool:
        """Whether a forward hook other than enable_paging's own may see a reused buffer."""
        from torch.nn.modules import module as nn_module

        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        return _hook_count(self.reused) != self.own_hooks

    def new_cache(self, model: torch.nn.Module, max_tokens: Optional[int] = None) -> PagedKVCache:
        return PagedKVCache(
            model.config,
            pager=self.pager,
            sink_pages=self.sink_pages,
            hot_fraction=self.hot_fraction,
            stream_group_bytes=self.stream_group_bytes,
            max_tokens=max_tokens,
            makes_room=not self.paged_layers,  # paged weights share the pager: its policy makes room for both
        )


def enable_paging(
    model: torch.nn.Module,
    memory_config: Optional[MemoryConfig] = None,
    *,
    pager: Optional[Pager] = None,
    attn_implementation: str = "auto",
    prefill_chunk_size: Optional[int] = None,
    sink_pages: int = 1,
    hot_fraction: float = 0.25,
    stream_group_bytes: SizeLike = DEFAULT_STREAM_GROUP_BYTES,
    page_weights: bool = False,
) -> torch.nn.Module:
    """Make ``model`` (a transformers causal LM) generate with a paged KV cache; returns ``model``.

    Args:
        model: a ``PreTrainedModel`` with ``generate``, on the pager's device; with
            ``page_weights=True`` it may be on the CPU (a model larger than the GPU): the layers'
            weights are paged from there and the rest moves to the pager's device.
        memory_config: budgets of the pager created for the model (default ``MemoryConfig()``); the
            pager's own prefetching is turned off (the cache schedules its transfers).
        pager: an existing pager to use instead (then ``memory_config`` must be None).
        attn_implementation: ``"pagedllm"``, ``"auto"`` (``"pagedllm"`` on a GPU or under the Triton
            interpreter, else the model's own), or any transformers implementation (the cache then
            returns dense keys and values).
        prefill_chunk_size: tokens per prefill chunk under ``"pagedllm"`` (default 2048).
        sink_pages, hot_fraction, stream_group_bytes: see :class:`~pagedtensor.hf.cache.PagedKVCache`.
        page_weights: also page the weights: every parameter of every decoder layer is replaced by a
            ``PagedTensor`` parameter on the pager (one budget for weights and KV; an op faults in
            the pages of the weights it reads; a PagedTensor of another pager is copied onto it),
            except those smaller than one page (the layers' norms), which stay dense on the device:
            a page each would take a page of the budget and a page-sized copy at each fault-in. A
            forward pre-hook on layer ``i`` prefetches layer ``i + 1``'s weights (layer 0's after the
            last). The embeddings, the final norm and
            ``lm_head`` stay dense: they are used by every token outside the layer loop (and the
            embedding is often tied to ``lm_head``), and the norm is tiny. Outputs are unchanged (the
            same ops run on the same data). Every single weight must fit in the device budget (of a
            routed experts' stack, one expert's matrix; checked here: a ``DeviceTierFullError``
            names the weight), and the tiers together must hold the paged weights and one more copy
            of the largest (a weight faulted in keeps its lower copy until its slots are filled;
            checked here: an ``OutOfPagesError`` names the sizes), and the KV cache beside them
            while generating.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generate") or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers causal LM (a PreTrainedModel with generate), got {type(model).__name__}")
    if getattr(model, STATE_ATTRIBUTE, None) is not None:
        raise ValueError("enable_paging: paging is already enabled on this model")
    stream_group_bytes = check_paging_options(
        memory_config=memory_config, pager=pager, attn_implementation=attn_implementation, prefill_chunk_size=prefill_chunk_size,
        sink_pages=sink_pages, hot_fraction=hot_fraction, stream_group_bytes=stream_group_bytes, page_weights=page_weights,
    )  # fmt: skip
    unpageable = _kv_cache_unsupported(model)
    if unpageable is not None:
        raise TypeError(f"enable_paging: {type(model).__name__} {unpageable}; the paged KV cache serves decoder-only attention models")
    _refuse_accelerate_dispatch(model, "enable_paging")
    if attn_implementation == ATTENTION_NAME:
        unsupported = _paged_attention_unsupported(model)
        if unsupported is not None:
            raise ValueError(
                f"attn_implementation={ATTENTION_NAME!r}: {type(model).__name__} {unsupported}; pass \"auto\" (the model's "
                f"own attention, {model.config._attn_implementation!r}, reads the paged cache) or another implementation"
            )
    created = pager is None
    if created:
        pager = Pager(streaming_config(memory_config if memory_config is not None else MemoryConfig()))
    own_attention = _attention_settings(model)
    try:
        _install(model, pager, attn_implementation, prefill_chunk_size, sink_pages, hot_fraction, stream_group_bytes, page_weights, own_attention)
    except BaseException:  # the model as it was, and no pager left open for the garbage collector
        _restore_attention_settings(own_attention)
        if created:
            pager.close()
        raise
    return model


def _refuse_accelerate_dispatch(model: torch.nn.Module, caller: str) -> None:
    """Raise where accelerate dispatched ``model`` (``from_pretrained(device_map=...)`` over several
    devices, or offloading to the CPU or disk): its hooks move weights at every forward (from the
    CPU, or from the offload folder into meta parameters), undoing whatever the pager placed, and an
    offloaded weight has no data to page. A ``device_map`` naming one device leaves no hooks."""
    hooked = [name for name, module in model.named_modules() if getattr(module, "_hf_hook", None) is not None]
    if not hooked:
        return
    placed = sorted({str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()})
    raise ValueError(
        f"{caller}: accelerate dispatched the model (device_map placing it on {', '.join(placed) or 'several devices'}; "
        f"hooks on {len(hooked)} modules, {hooked[0] or 'the model itself'!r} first), and its hooks move weights at every "
        f"forward, so the pager cannot place them: load the model without device_map (or with one device); with "
        f"page_weights=True its decoder layers' weights are paged from the CPU, so it need not fit on the GPU"
    )


def check_paging_options(
    *, memory_config: Optional[MemoryConfig], pager: Optional[Pager], attn_implementation: str, prefill_chunk_size: Optional[int],
    sink_pages: int, hot_fraction: float, stream_group_bytes: SizeLike, page_weights: bool,
) -> int:  # fmt: skip
    """:func:`enable_paging`'s checks of its options (every one but ``model``, by name) that need no
    model (``PagedModel.from_pretrained`` runs them before it loads one); returns
    ``stream_group_bytes`` in bytes."""
    if pager is not None and memory_config is not None:
        raise ValueError("enable_paging: pass either memory_config or pager, not both")
    check_memory_config(memory_config)
    if pager is not None and not isinstance(pager, Pager):
        raise TypeError(f"pager: expected a Pager, got {type(pager).__name__}")
    if not isinstance(page_weights, bool):
        raise TypeError(f"page_weights: expected True or False, got {page_weights!r}")
    if not isinstance(attn_implementation, str):
        raise TypeError(f"attn_implementation: expected a string (\"auto\", {ATTENTION_NAME!r}, \"sdpa\", ...), got {attn_implementation!r}")
    if prefill_chunk_size is not None:
        _check_prefill_chunk_size(prefill_chunk_size)
    return check_cache_settings(sink_pages, hot_fraction, stream_group_bytes)


def _check_prefill_chunk_size(prefill_chunk_size: object) -> None:
    if isinstance(prefill_chunk_size, bool) or not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size: expected a positive int, got {prefill_chunk_size!r}")


def _install(
    model: torch.nn.Module, pager: Pager, attn_implementation: str, prefill_chunk_size: Optional[int], sink_pages: int,
    hot_fraction: float, stream_group_bytes: SizeLike, page_weights: bool, own_attention: list[tuple[Any, Any]],
) -> None:  # fmt: skip
    """The rest of :func:`enable_paging`, once the pager exists (``own_attention``: the model's
    :func:`_attention_settings` before the call): on an error the model's own attention and weights
    are left as they were. Everything that may fail runs before the model changes; then the weights
    are paged (undone if they do not fit), and the hooks go on last."""
    if prefill_chunk_size is None:
        prefill_chunk_size = DEFAULT_PREFILL_CHUNK
    _check_prefill_chunk_size(prefill_chunk_size)
    model_device = _model_device(model)
    if model_device is not None and model_device != pager.device and not page_weights:
        raise ValueError(
            f"the model is on {model_device} but the pager's device tier is {pager.device}: move the model, set "
            f"MemoryConfig(device=...), or pass page_weights=True (the decoder layers' weights are paged from where "
            f"they are, the rest moves to {pager.device})"
        )

    register_attention()
    if attn_implementation == "auto":
        from pagedtensor.triton_kernels._common import interpreting

        use_kernels = pager.device.type == "cuda" or interpreting()
        attn_implementation = model.config._attn_implementation
        if use_kernels and _paged_attention_unsupported(model) is None:
            try:
                _set_attn_implementation(model, ATTENTION_NAME)
                attn_implementation = ATTENTION_NAME
            except ValueError:  # the model refused to switch: any sub-config its setter switched goes back
                _restore_attention_settings(own_attention)
        if attn_implementation != ATTENTION_NAME:
            log.info("enable_paging: %s keeps its %r attention over the paged cache", type(model).__name__, attn_implementation)
    if attn_implementation != model.config._attn_implementation:
        attn_implementation = _set_attn_implementation(model, attn_implementation)  # as transformers stores it
    if attn_implementation == ATTENTION_NAME:
        _keep_other_towers_attention(model, own_attention)

    state = PagingState(
        pager=pager,
        attn_implementation=attn_implementation,
        prefill_chunk_size=prefill_chunk_size,
        sink_pages=sink_pages,
        hot_fraction=hot_fraction,
        stream_group_bytes=stream_group_bytes,
        cache_keyword=cache_keyword(model),
        original_generate=bound_weakly(model.generate, model),
    )
    layers = _decoder_layers(model)
    decoder = _decoder_module(model, layers)
    norm = _final_norm(decoder)
    embeddings = _input_embeddings(model)
    state.reused_refs = [
        weakref.ref(module)
        for module in (
            *([embeddings] if embeddings is not None else []),  # its output is layer 0's input
            *(module for layer in layers for module in layer.modules()),  # chunks of their inputs
            *([norm] if norm is not None else []),
        )
    ]
    if page_weights:
        _page_layer_weights(model, layers, state)
    state.hooks.append(model.register_forward_pre_hook(_begin_forward_hook, with_kwargs=True))
    state.hooks.append(model.register_forward_hook(_end_forward_hook, always_call=True))  # also when forward raises
    if decoder is not None and decoder is not model:
        begin, end = _decoder_hooks(state)
        state.hooks.append(decoder.register_forward_pre_hook(begin, with_kwargs=True))
        state.hooks.append(decoder.register_forward_hook(end, always_call=True))
    for layer in layers:
        layer.forward = bound_weakly(layer.forward, layer, functools.partial(_chunked_layer_forward, state=state))
    if norm is not None:
        norm.forward = bound_weakly(norm.forward, norm, functools.partial(_chunked_rowwise_forward, state=state))
    state.own_hooks = _own_hook_count(state)
    setattr(model, STATE_ATTRIBUTE, state)
    model.generate = _paged_generate(weakref.ref(model), state)
    model.__reduce_ex__ = _refuse_to_copy_or_save  # pickle and deepcopy look it up on the instance first
    if page_weights:
        from transformers import PreTrainedModel

        for module in model.modules():  # the model and each PreTrainedModel in it (its decoder, model.model, saves alone too)
            if module is model or isinstance(module, PreTrainedModel):
                module.save_pretrained = DenseSavePretrained(module, bound_weakly(module.save_pretrained, module))


def _alive(refs: list) -> list:
    """The objects of the weak references ``refs`` still alive, in order."""
    return [value for value in (ref() for ref in refs) if value is not None]


def bound_weakly(method: Any, owner: torch.nn.Module, wrap: Optional[Any] = None) -> Any:
    """``method`` (``owner.forward``, ``owner.generate``), where it is a method bound to ``owner``, as a
    :class:`WeaklyBoundMethod` (``wrap`` applied to it: a chunked forward); any other callable as
    it is (``wrap`` applied)."""
    if inspect.ismethod(method) and method.__self__ is owner:
        return WeaklyBoundMethod(method.__func__, owner, wrap)
    return method if wrap is None else wrap(method)


class WeaklyBoundMethod:
    """``function`` bound to ``owner`` through a weak reference, with the bound method's signature
    (transformers reads ``generate``'s), the call passed through ``wrap`` where given (a chunked
    forward of :func:`_chunked_layer_forward`).

    What enable_paging stores on a module itself (``module.forward = ...``) must not hold the
    module: a reference cycle keeps a dropped model, and its pager's device slabs, pinned host
    memory and page file, alive until Python's cycle collector runs, where a transformers model goes
    at ``del`` by reference counting. ``copy.deepcopy`` of the module (a decoder layer, one of its
    linears) binds the copy's to the copy, so the copy runs its own weights (a function's closure is
    shared by a deep copy: it ran the original's), ``wrap`` and what it holds (the model's paging
    state) shared; ``pickle`` (``torch.save`` of a submodule) saves ``function`` bound to the
    module, without ``wrap``."""

    def __init__(self, function: Any, owner: torch.nn.Module, wrap: Optional[Any] = None) -> None:
        self.function, self.owner_ref, self.wrap = function, weakref.ref(owner), wrap
        owner_ref = self.owner_ref

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            return function(owner_ref(), *args, **kwargs)

        call.owner_ref = owner_ref  # what ``wrap`` may read: the module (a decoder layer in training mode)

        signature = _signature(types.MethodType(function, owner))
        if signature is not None:
            call.__signature__ = signature
        self.call = call if wrap is None else wrap(call)
        functools.update_wrapper(self, self.call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "WeaklyBoundMethod":
        owner = self.owner_ref()
        copied = memo.get(id(owner)) if owner is not None else None
        return self if copied is None else WeaklyBoundMethod(self.function, copied, self.wrap)

    def __reduce__(self) -> tuple:
        return WeaklyBoundMethod, (self.function, self.owner_ref())


def _refuse_to_copy_or_save(protocol: int = 2) -> Any:
    """A paged model's ``__reduce_ex__``: ``torch.save(model)``, ``pickle``, ``copy.copy`` and
    ``copy.deepcopy`` of it raise naming what to do, where they failed on a layer's wrapped forward or
    a prefetch hook (a shallow copy would share the pager and call the original's wrapped methods)."""
    raise TypeError(
        "torch.save, pickle, copy.copy or copy.deepcopy of a model after enable_paging: its pager (device slabs, pinned "
        "host memory, a page file) cannot be saved or copied. Save model.save_pretrained(path) (dense files) or "
        "model.state_dict() (with page_weights=True its weights are PagedTensors: a file torch.save writes of it needs "
        "pagedtensor imported to load; materialize() each for plain tensors), or copy the model before enable_paging, "
        "then enable paging on each copy"
    )


def paging_state(model: torch.nn.Module) -> Optional[PagingState]:
    """The :class:`PagingState` of a model given to :func:`enable_paging`, else None."""
    return getattr(model, STATE_ATTRIBUTE, None)


def cache_keyword(model: torch.nn.Module) -> str:
    """``"cache"`` (transformers 5.2x) or ``"past_key_values"`` (5.17): how ``forward``/``generate`` name the cache."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


# ---------------------------------------------------------------------- generate


class DenseSavePretrained:
    """``save_pretrained`` of a model with paged weights, and of each ``PreTrainedModel`` in it (its
    decoder, ``model.model``), set on each by :func:`_install`: the state dict it saves holds dense CPU
    copies of the PagedTensors (read through the pager), so the files load anywhere, without
    pagedtensor; so does a ``state_dict`` passed in. (transformers tells tensors apart by their
    storage, which every PagedTensor's wrapper shares, and would refuse them as shared tensors;
    safetensors reads their data pointers.) The call's arguments are bound to ``save_pretrained``'s
    own signature, so a ``state_dict`` passed by position (``save_pretrained(path, True, state_dict)``)
    is the one saved, and a call that does not bind raises its ``TypeError``.

    It holds its module weakly, as :class:`WeaklyBoundMethod` does (``save_pretrained`` is the
    module's own, bound weakly): a deep copy of the module (a decoder: the model refuses one) saves
    the copy's weights, and ``pickle`` (``torch.save`` of the decoder) keeps it for the loaded module,
    whose weights are PagedTensors still."""

    def __init__(self, owner: torch.nn.Module, save_pretrained: Any) -> None:
        self.owner_ref, self.save_pretrained = weakref.ref(owner), save_pretrained
        self.signature = inspect.signature(save_pretrained)
        functools.update_wrapper(self, save_pretrained, updated=())  # its name, doc and signature; not its attributes

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from pagedtensor.tensor import PagedTensor

        owner = self.owner_ref()
        if owner is None:  # torch.load(...).save_pretrained(path): the loaded module went before the call
            raise ReferenceError(
                f"{self.__name__}: the module it saves is gone (it holds the module weakly, so that a dropped paged "
                "model frees its pager at once): keep a reference to the module while it saves"
            )
        arguments = self.signature.bind(*args, **kwargs)
        state_dict = arguments.arguments.get("state_dict")
        arguments.arguments["state_dict"] = {
            name: value.materialize("cpu") if isinstance(value, PagedTensor) else value
            for name, value in (owner.state_dict() if state_dict is None else state_dict).items()
        }
        return self.save_pretrained(*arguments.args, **arguments.kwargs)

    def __deepcopy__(self, memo: dict) -> "DenseSavePretrained":
        owner = self.owner_ref()
        copied = memo.get(id(owner)) if owner is not None else None
        return self if copied is None else DenseSavePretrained(copied, copy.deepcopy(self.save_pretrained, memo))

    def __reduce__(self) -> tuple:
        return DenseSavePretrained, (self.owner_ref(), self.save_pretrained)


def _paged_generate(model_ref: "weakref.ref[torch.nn.Module]", state: PagingState):
    original = state.original_generate

    signature = _signature(original)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        cache = None
        arguments = _call_arguments(signature, args, kwargs)
        paged = _find_cache(arguments)  # the caller's own paged cache, or None
        claimed = paged.claim() if paged is not None else False  # refused while another thread uses it
        try:
            model = model_ref()
            if paged is None and _wants_paged_cache(model, arguments):
                inputs = arguments.get("inputs", arguments.get("input_ids"))
                max_tokens = None
                if isinstance(inputs, torch.Tensor) and inputs.dim() == 2:
                    new = _generation_setting(model, arguments, "max_new_tokens")
                    max_tokens = inputs.shape[1] + new if new else _generation_setting(model, arguments, "max_length")
                cache = paged = state.new_cache(model, max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None)
                kwargs[state.cache_keyword] = cache
            output = _generate_with(state.calls, paged, original, args, kwargs)
        except BaseException:
            if cache is not None:
                cache.close()
            raise
        finally:
            if claimed:
                paged.unclaim()
        if cache is not None and not _carries(output, cache):
            cache.close()
        return output

    return generate


def _generate_with(calls: CallState, cache: Optional[PagedKVCache], original: Any, args: tuple, kwargs: dict) -> Any:
    """``original(*args, **kwargs)`` (transformers' generate) filling ``cache``: its forwards keep the
    cache's sink and newest pages pinned from step to step, and they are unpinned once it returns
    or raises (a cache that outlives the call, in its output or the caller's, leaves the device to others)."""
    outer, calls.generating = calls.generating, cache
    try:
        return original(*args, **kwargs)
    finally:
        calls.generating = outer
        if cache is not None and not cache.closed:
            cache.release_hot_pins()


def _signature(function: Any) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # a callable without one: keyword arguments only are read
        return None


def _forward_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """A forward call's arguments by name (:func:`_call_arguments`). Under ``torch.compile(model)``,
    which traces this pre-hook, by the class's ``forward`` (``self`` bound to ``module``): of a
    forward replaced by its compiled self (``model.forward = torch.compile(model.forward)``, as the
    README shows), Dynamo failed following the compiled function's ``__wrapped__``."""
    if torch.compiler.is_compiling():
        signature = _signature(type(module).forward)
        arguments = _call_arguments(signature, (module, *args), kwargs)
        if signature is not None and signature.parameters:
            arguments.pop(next(iter(signature.parameters)), None)  # self
        return arguments
    return _call_arguments(_signature(module.forward), args, kwargs)


def _call_arguments(signature: Optional[inspect.Signature], args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name, those passed by position included (``generate(ids,
    GenerationConfig(...))``, ``model(ids, mask)``), with its ``**kwargs`` merged in. A call that
    does not bind gives the keyword arguments only (the callee itself then raises)."""
    if signature is None:
        return dict(kwargs)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _generation_setting(model: torch.nn.Module, arguments: dict, name: str, default: Any = None) -> Any:
    """A generation setting as ``generate`` resolves it: the keyword argument, else the generation
    config passed where it sets the field, else ``model.generation_config``'s, else ``default``
    (transformers fills a passed config's unset fields, ``None``, from the model's)."""
    if arguments.get(name) is not None:
        return arguments[name]
    for config in (arguments.get("generation_config"), getattr(model, "generation_config", None)):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return default


# The ``cache_implementation`` values under which generate gets the paged cache: none, and
# ``"hybrid"``, which transformers' generate unsets for its ``DynamicCache`` (Gemma 2 and 3 ship it in
# their generation configs, from before transformers' dynamic sliding-window layers). An explicit
# ``"dynamic"`` keeps transformers' cache: generate refuses a cache passed beside it.
_PAGED_CACHE_IMPLEMENTATIONS = (None, "hybrid")


def _wants_paged_cache(model: torch.nn.Module, arguments: dict) -> bool:
    """Whether a ``generate`` call with ``arguments`` (:func:`_call_arguments`) gets a paged
    cache: not when it brings its own cache, runs without one or asks for a cache implementation
    (:data:`_PAGED_CACHE_IMPLEMENTATIONS`: ``"hybrid"`` aside, which transformers itself ignores).
    Beam search gets one: beams kept twice share their pages (copy-on-write,
    :meth:`PagedKVCache.reorder_cache`). So does assisted decoding (``assistant_model``,
    ``prompt_lookup_num_tokens``): the model checks a draft's tokens in one forward and transformers
    crops the cache back past the rejected ones (:meth:`PagedKVCache.crop`; the cache keeps every
    token of a sliding-window layer and masks the window, so a crop never needs a token it dropped).
    A paged draft model gets its own paged cache in its first ``generate``, which transformers then
    passes back to it."""
    if arguments.get("cache") is not None or arguments.get("past_key_values") is not None:
        return False
    if _generation_setting(model, arguments, "use_cache", True) is False:
        return False
    if _generation_setting(model, arguments, "cache_implementation") not in _PAGED_CACHE_IMPLEMENTATIONS:
        return False
    return True


def _carries(output: object, cache: PagedKVCache) -> bool:
    """Whether a generate output holds ``cache`` (field ``cache`` on transformers 5.2x, ``past_key_values`` on 5.17)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    name = "cache" if "cache" in fields else "past_key_values"
    return name in fields and getattr(output, name, None) is cache


# ---------------------------------------------------------------------- forward hooks and wrappers


def _find_cache(kwargs: dict) -> Optional[PagedKVCache]:
    for name in ("cache", "past_key_values"):
        value = kwargs.get(name)
        if isinstance(value, PagedKVCache):
            return value
    return None


def _begin_forward_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Before every forward of a paged model: this thread's call state set, and the padding of the
    forward's new tokens given to the cache it fills (:meth:`PagedKVCache.begin_forward`)."""
    _begin_forward(module, args, kwargs, paging_state(module))


def _decoder_hooks(state: PagingState) -> tuple["_DecoderHook", "_DecoderHook"]:
    """The forward pre-hook and hook of the model's decoder (the module that runs the decoder layers,
    ``model.model``), for a forward of the decoder alone (``model.model(ids, attention_mask=...,
    cache=...)``): as the model's own, where no forward of the model runs on this thread (then the
    model's hooks did it). They hold the state by a weak reference (the model holds the state)."""
    return _DecoderHook(state, at_end=False), _DecoderHook(state, at_end=True)


class _DecoderHook:
    """One of :func:`_decoder_hooks`: ``at_end`` the forward hook, else the pre-hook (with kwargs).
    A deep copy of the decoder shares it; ``pickle`` (``torch.save(model.model)``) saves none, as
    the pager is not saved: it loads as a hook that does nothing."""

    def __init__(self, state: PagingState, at_end: bool) -> None:
        self.state_ref, self.at_end = weakref.ref(state), at_end

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs_or_output: Any) -> None:
        state = self.state_ref()
        if state is None:
            return
        if self.at_end:
            if state.calls.outer == id(module):
                _end_forward(state)
        elif state.calls.outer in (None, id(module)):
            _begin_forward(module, args, kwargs_or_output, state)

    def __deepcopy__(self, memo: dict) -> "_DecoderHook":
        return self

    def __reduce__(self) -> tuple:
        return _no_decoder_hook, ()


def _no_decoder_hook() -> Any:
    """What a pickled :class:`_DecoderHook` loads as: :func:`_no_hook`."""
    return _no_hook


def _no_hook(module: torch.nn.Module, args: tuple, kwargs_or_output: Any) -> None:
    """A forward hook or pre-hook that does nothing."""


def _begin_forward(module: torch.nn.Module, args: tuple, kwargs: dict, state: Optional[PagingState]) -> None:
    if args:  # model(ids, mask, ...): the mask (and a cache) may come by position
        kwargs = _forward_arguments(module, args, kwargs)
    inputs = kwargs.get("input_ids")
    if inputs is None and args:
        inputs = args[0]
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    cache = _find_cache(kwargs)
    if cache is not None:
        _refuse_cross_attention(module, kwargs)
    PAGED_FORWARD.set(False)  # until begin_forward below has accepted the padding
    MASKED_WINDOWS.set(frozenset())  # the masks this forward makes say theirs
    if state is not None:
        calls = state.calls
        if calls.forward_cache is not None:  # the last forward on this thread ended in a KeyboardInterrupt, skipping the forward hook
            _end_call(calls)
        calls.outer = id(module)
        config = getattr(module, "config", None)
        captures = any(
            kwargs.get(name, getattr(config, name, False)) for name in ("output_hidden_states", "output_attentions")
        ) or state.user_hooks()  # a hook may keep a layer's input or output, which in-place reuse overwrites
        calls.in_place = cache is not None and not captures and not torch.is_grad_enabled() and kwargs.get("inputs_embeds") is None
        calls.chunked = not any(  # what transformers records from inside a layer (attentions, router logits) comes once per chunk
            kwargs.get(f"output_{name}", getattr(config, f"output_{name}", False)) for name in _recorded_inside_layers(module)
        )
        if cache is not None:
            calls.claimed = cache.claim()  # refused while another thread uses the cache (which is then left alone)
            calls.forward_cache = weakref.ref(cache)
    if cache is not None and isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        cache.begin_forward(mask, inputs.shape[1])
    PAGED_FORWARD.set(cache is not None)


def _recorded_inside_layers(module: torch.nn.Module) -> set[str]:
    """The outputs transformers records from modules inside the decoder layers of ``module``'s model
    (``output_<name>=True``): attentions, and those its ``_can_record_outputs`` names, such as a
    mixture of experts' ``router_logits``; not the hidden states, which the layers return."""
    return {"attentions", *(getattr(module, "_can_record_outputs", None) or ())} - {"hidden_states"}


def _decoder_module(model: torch.nn.Module, layers: list[torch.nn.Module]) -> Optional[torch.nn.Module]:
    """The module whose child ``nn.ModuleList`` holds the decoder ``layers`` (``model.model``), or None."""
    if not layers:
        return None
    for module in model.modules():
        for child in module.children():
            if isinstance(child, torch.nn.ModuleList) and len(child) and child[0] is layers[0]:
                return module
    return None


def _input_embeddings(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The model's input embedding module, or None (transformers raises NotImplementedError for a model without one)."""
    try:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        return None
    return embeddings if isinstance(embeddings, torch.nn.Module) else None


# transformers' output-capturing hook (``output_hidden_states=True`` and the like): installed on the
# layers by the first forward that asks for such outputs and left there for good.
TRANSFORMERS_CAPTURE_HOOK = "output_capturing_hook"


def _hook_count(modules: list) -> int:
    """Forward hooks and pre-hooks on ``modules``, but transformers' output-capturing hooks: they keep a
    layer's hidden states only in a forward that asks for them (``output_hidden_states``), which
    in-place reuse already leaves alone, and counting them would turn in-place reuse off for good
    after the first such forward."""
    return sum(
        1
        for module in modules
        for hooks in (module._forward_hooks, module._forward_pre_hooks)
        for hook in hooks.values()
        if getattr(hook, "__name__", None) != TRANSFORMERS_CAPTURE_HOOK
    )


def _own_hook_count(state: PagingState) -> int:
    """How many of the hooks on ``state.reused`` enable_paging added (the weights' prefetch hooks):
    any other, registered before or after, is the user's."""
    reused = {id(hooks) for module in state.reused for hooks in (module._forward_hooks, module._forward_pre_hooks)}
    return sum(1 for handle in state.hooks if id(handle.hooks_dict_ref()) in reused)


def _end_forward_hook(module: torch.nn.Module, args: tuple, output: object) -> None:
    """After every forward of a paged model, also one that raised: the per-thread call state reset,
    and the cache a forward outside ``generate`` filled left with no pinned pages (its next update
    pins them again), so that the pager can evict them for other work. ``generate``'s own forwards
    keep them from step to step (it unpins them when it returns)."""
    _end_forward(paging_state(module))


def _end_forward(state: Optional[PagingState]) -> None:
    PAGED_FORWARD.set(False)
    ACTIVE_UPDATE.set(None)  # a forward that raised after an update kept the cache alive through it
    if state is not None:
        _end_call(state.calls)


def _end_call(calls: CallState) -> None:
    """Reset this thread's ``calls`` after a forward; unclaim and unpin the cache it filled (see :func:`_end_forward_hook`)."""
    cache = calls.forward_cache() if calls.forward_cache is not None else None
    claimed = calls.claimed
    calls.in_place, calls.chunked, calls.forward_cache, calls.claimed, calls.outer = False, True, None, False, None
    if cache is None:
        return
    if claimed:
        cache.unclaim()
    if cache is not calls.generating and not cache.closed:
        cache.release_hot_pins()


def _chunked_layer_forward(forward, state: PagingState):
    """A decoder layer's forward that runs a long input in chunks of ``prefill_chunk_size`` tokens.

    When nothing captures hidden states (and without autograd), each chunk's output overwrites the
    chunk's rows of the input, which no later chunk reads: one sequence-long buffer serves every layer.
    """

    owner_ref = getattr(forward, "owner_ref", None)  # the layer (a WeaklyBoundMethod's call)

    @functools.wraps(forward)
    def chunked(hidden_states, *args, **kwargs):
        chunk = state.prefill_chunk_size
        cache = _find_cache(kwargs)
        layer = owner_ref() if owner_ref is not None else None
        if (
            args
            or not state.calls.chunked
            # In training mode (a generate inside a training loop) dropout draws one mask a call: a
            # chunk each drew other random numbers than the whole input does, and other tokens came.
            or (layer is not None and layer.training)
            or cache is None
            or not cache.uses_paged_attention
            or not isinstance(hidden_states, torch.Tensor)
            or hidden_states.dim() != 3
            or hidden_states.shape[1] <= chunk
            or (isinstance(kwargs.get("attention_mask"), torch.Tensor) and kwargs["attention_mask"].dim() != 2)
            or _other_per_token_argument(kwargs, hidden_states.shape[1])
        ):
            return forward(hidden_states, *args, **kwargs)
        length = hidden_states.shape[1]
        out = None
        extras: tuple = ()  # what a layer returning a tuple gives beside its hidden states
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            piece = dict(kwargs)
            embeddings = kwargs.get("position_embeddings")
            if isinstance(embeddings, torch.Tensor):  # one tensor (Llama 4's complex frequencies)
                piece["position_embeddings"] = _slice_tokens(embeddings, length, start, stop)
            elif embeddings is not None:  # (cos, sin)
                piece["position_embeddings"] = tuple(_slice_tokens(t, length, start, stop) for t in embeddings)
            if kwargs.get("position_ids") is not None:
                piece["position_ids"] = kwargs["position_ids"][..., start:stop]
            result = forward(hidden_states[:, start:stop], **piece)
            hidden = result[0] if isinstance(result, tuple) else result
            if isinstance(result, tuple):
                # Layers written before transformers returned bare tensors (Chameleon's) return
                # (hidden_states,) and the model reads layer_outputs[0]: give the same structure back.
                # Anything beside the hidden states (attention weights, router logits) is per chunk
                # and cannot be joined: such a layer must not run in chunks.
                if any(extra is not None for extra in result[1:]):
                    raise NotImplementedError(
                        f"chunked prefill: a decoder layer returned {len(result)} outputs, and those beside its hidden "
                        f"states cannot be joined across chunks; pass a prefill_chunk_size above the prompt length"
                    )
                extras = tuple(result[1:])
            if out is None:
                same_shape = hidden.shape[-1] == hidden_states.shape[-1] and hidden.dtype == hidden_states.dtype
                out = hidden_states if state.calls.in_place and same_shape else hidden_states.new_empty(
                    (hidden_states.shape[0], length, hidden.shape[-1]), dtype=hidden.dtype
                )
            out[:, start:stop] = hidden
        return (out, *extras) if isinstance(result, tuple) else out

    return chunked


# A decoder layer's keyword arguments that a chunked forward knows how to pass a chunk: sliced along
# their tokens (position embeddings and ids) or whole (the 2D padding mask, the cache's positions).
_CHUNKED_ARGUMENTS = frozenset({"attention_mask", "position_ids", "position_embeddings", "cache_position", "cache", "past_key_values"})


def _other_per_token_argument(kwargs: dict, length: int) -> bool:
    """Whether a keyword argument other than :data:`_CHUNKED_ARGUMENTS` is a tensor with a dim of
    ``length`` (the input's tokens): one value a token, such as Beam's ``attention_scaling``, which a
    chunk would get whole (a shape error). Such a layer runs unchunked."""
    return any(isinstance(value, torch.Tensor) and length in value.shape for name, value in kwargs.items() if name not in _CHUNKED_ARGUMENTS)


def _slice_tokens(tensor: torch.Tensor, length: int, start: int, stop: int) -> torch.Tensor:
    """``tensor``'s slice ``[start, stop)`` along its token dimension (the last one of size ``length`` before the feature dim)."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    for dim in range(tensor.dim() - 2, -1, -1):
        if tensor.shape[dim] == length:
            return tensor.narrow(dim, start, stop - start)
    return tensor


def _chunked_rowwise_forward(forward, state: PagingState):
    """A row-wise module (the final norm) applied chunk by chunk on long inputs, where the decoder
    layers ran in chunks (a forward with a paged cache under "pagedllm"): same result, bounded
    temporaries. Any other forward (no cache: training) runs it whole, so its weight's gradient is
    the unpaged model's sum, not a sum of per-chunk sums."""

    @functools.wraps(forward)
    def chunked(hidden_states, *args, **kwargs):
        chunk = state.prefill_chunk_size
        if args or kwargs or not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or hidden_states.shape[1] <= chunk:
            return forward(hidden_states, *args, **kwargs)
        if state.attn_implementation != ATTENTION_NAME or not PAGED_FORWARD.get() or not state.calls.chunked:
            return forward(hidden_states)
        out = None
        for start in range(0, hidden_states.shape[1], chunk):
            part = forward(hidden_states[:, start : start + chunk])
            if out is None:
                same = part.shape[2:] == hidden_states.shape[2:] and part.dtype == hidden_states.dtype
                out = hidden_states if state.calls.in_place and same else part.new_empty(hidden_states.shape[:2] + part.shape[2:])
            out[:, start : start + part.shape[1]] = part
        return out

    return chunked


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers, in the order they run: the blocks of each ``nn.ModuleList`` of
    ``num_hidden_layers`` blocks (the text config's) that each hold an attention with a ``layer_idx``
    (GPT-Neo's ``layer_id``), whatever the model names it (``self_attn``: Llama, OPT, Phi; ``attn``: GPT-2, GPT-J, MPT,
    CodeGen; ``self_attention``: Falcon, Bloom; ``attention``: GPT-NeoX)."""
    count = getattr(_text_config(model), "num_hidden_layers", None)
    return [
        block
        for module in model.modules()
        if isinstance(module, torch.nn.ModuleList) and count and len(module) == count and all(map(_holds_layer_index, module))
        for block in module
    ]


def _holds_layer_index(block: torch.nn.Module) -> bool:
    """Whether a submodule of ``block`` has an int ``layer_idx`` (``layer_id`` in GPT-Neo): an attention,
    which reads its layer's keys and values from the cache by it."""
    return any(isinstance(getattr(module, "layer_idx", getattr(module, "layer_id", None)), int) for module in block.modules())


def _page_layer_weights(model: torch.nn.Module, layers: list, state: PagingState) -> None:
    """Replace every parameter of the decoder ``layers`` (:func:`_decoder_layers`) but those smaller
    than a page (norms: they stay dense on the device) by a PagedTensor parameter on ``state.pager``
    (``requires_grad=False``: paged weights are for inference) and hook
    the layer-ahead prefetch (layer ``i``'s pre-hook prefetches layer ``i + 1``'s weights); each
    ``nn.Linear`` (transformers' ``Conv1D``, Falcon's ``FalconLinear``) with a paged weight runs
    through :func:`_paged_linear_forward` (:func:`_paged_conv1d_forward`,
    :func:`_paged_falcon_linear_forward`): the weight is read from its pinned pages. The
    weights are advised ``"loop"`` (:meth:`Pager.advise`): once the layers do not all fit, the same
    ones stay resident token after token and only the rest move."""
    from pagedtensor.tensor import PagedTensor

    pager = state.pager
    if not layers:
        count = getattr(_text_config(model), "num_hidden_layers", None)
        raise ValueError(
            f"page_weights=True: found no decoder layers in {type(model).__name__}: no nn.ModuleList of "
            f"config.num_hidden_layers={count} blocks that each hold an attention with a layer_idx. "
            "page_weights=False still pages the KV cache"
        )
    for index, layer in enumerate(layers):  # checked before any weight is replaced
        for name, parameter in layer.named_parameters():
            if type(parameter) not in (torch.nn.Parameter, torch.Tensor) and not isinstance(parameter, PagedTensor):
                raise TypeError(
                    f"page_weights=True: layers.{index}.{name} is a {type(parameter).__name__}, which cannot be paged "
                    "(a tensor-parallel shard loaded with tp_plan='auto'?). Shard with "
                    "pagedtensor.hf.distributed.shard_by_heads to page weights, or keep page_weights=False"
                )
    weights: dict[int, tuple[str, torch.nn.Module, torch.Tensor]] = {}  # a parameter several modules hold: once, named by its first
    for prefix, module, to_page in _parameters_to_page(layers, pager.page_size):
        for name, parameter in to_page:
            weights.setdefault(id(parameter), (prefix + name, module, parameter))
    paged = list(weights.values())
    check_tiers_hold_weights(pager, [parameter.numel() * parameter.element_size() for _, _, parameter in paged])
    check_device_holds_each_weight(pager, _pages_each_op_reads(layers, pager.page_size))
    replaced: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    replacements: dict[int, torch.nn.Parameter] = {}  # id of a parameter -> its paged one: modules that share a parameter share it paged
    try:
        for index, layer in enumerate(layers):
            for module_name, module in layer.named_modules():
                for name, parameter in list(module._parameters.items()):
                    if parameter is None:
                        continue
                    if id(parameter) in replacements:
                        module._parameters[name] = replacements[id(parameter)]
                        replaced.append((module, name, parameter))
                        continue
                    # Used once a token, layer after layer ("loop"), but for the experts of a
                    # mixture-of-experts layer: a token reads those it is routed to (recency).
                    access = "normal" if routed_expert_stack(module, parameter) else "loop"
                    if isinstance(parameter, PagedTensor) and parameter.pager is pager:  # paged already: used in the loop all the same
                        if parameter.allocation is not None:
                            pager.advise(parameter.allocation, access)
                        continue
                    # A PagedTensor of another pager (a state dict torch.saved from a paged model loads on the
                    # default pager) is copied here, whatever its size: under this pager's budgets, and freed
                    # with it. A dense one smaller than a page (a norm's weight) stays dense.
                    if not isinstance(parameter, PagedTensor) and not pages_as_weight(parameter, pager.page_size):
                        continue
                    paged = PagedTensor.wrap(parameter.detach(), pager, name=f"layers.{index}.{module_name + '.' if module_name else ''}{name}")
                    pager.advise(paged.allocation, access)
                    _write_back_weight(pager, paged.allocation)
                    module._parameters[name] = replacements[id(parameter)] = torch.nn.Parameter(paged, requires_grad=False)
                    replaced.append((module, name, parameter))
        # A module outside the layers that holds a parameter paged here (lm_head tied to a layer's
        # weight) holds the paged one too, as model.to() keeps a tie: else it kept the dense tensor.
        for module in model.modules():
            for name, parameter in list(module._parameters.items()):
                if parameter is not None and id(parameter) in replacements:
                    module._parameters[name] = replacements[id(parameter)]
                    replaced.append((module, name, parameter))
        # A model loaded on the CPU: its paged weights came from there, page by page, and only what
        # stays dense goes to the device, so the device never holds the whole model.
        _move_dense_tensors(model, pager.device, pager)
    except BaseException:  # the weights do not fit (OutOfPagesError), or the dense rest does not: the dense weights back
        for module, name, parameter in replaced:
            module._parameters[name] = parameter
        raise
    state.paged_layer_refs = [weakref.ref(layer) for layer in layers]
    paged_forwards = _paged_forwards()
    for index, layer in enumerate(layers):
        state.hooks.append(layer.register_forward_pre_hook(_PrefetchHook(pager, weakref.ref(layers[(index + 1) % len(layers)]))))
        for module in layer.modules():
            forward = paged_forwards.get(type(module))
            if forward is not None and isinstance(module.weight, PagedTensor) and "forward" not in module.__dict__:
                module.forward = bound_weakly(types.MethodType(forward, module), module)


def check_tiers_hold_weights(pager: Pager, weights: list[int]) -> None:
    """Check that ``pager``'s tiers together hold the paged weights of ``weights`` bytes each, with
    room for one more copy of the largest: a weight faulted in keeps its host or disk copy until
    its device slots are filled, so while its pages come up, the pages evicted for them need lower
    slots of their own. (Copies beyond that are clean caches, which the pager drops for room.)
    Passes with an unlimited disk tier (``disk_limit=None``).

    Raises:
        OutOfPagesError: the tiers are too small, naming the sizes needed and configured.
    """
    disk = pager.disk_tier
    if not weights or (disk is not None and disk.capacity_pages is None):
        return
    page_size = pager.page_size
    pages = [-(-nbytes // page_size) for nbytes in weights]
    needed = sum(pages) + max(pages)
    held = pager.device_tier.capacity_pages + pager.host_tier.capacity_pages + (disk.capacity_pages if disk is not None else 0)
    if held < needed:
        config = pager.config
        tiers = f"vram_limit={config.vram_limit} + host_memory={config.host_memory}" + (
            f" + disk_limit={config.disk_limit} bytes" if disk is not None else " bytes (no disk tier)"
        )
        raise OutOfPagesError(
            f"page_weights=True: the paged weights take {sum(pages)} pages of {format_size(page_size)} "
            f"({format_size(sum(pages) * page_size)}), and a fault needs room for one more copy of the largest weight "
            f"({max(pages)} pages): {format_size(needed * page_size)} in all, but {tiers} hold {held} pages "
            f"({format_size(held * page_size)}); raise one of them by {format_size((needed - held) * page_size)}"
            f"{'' if disk is not None else ', or set nvme_path'}"
        )


def check_device_holds_each_weight(pager: Pager, weights: list[tuple[str, int]]) -> None:
    """Check that ``pager``'s device tier can hold each weight an op reads, ``weights`` being
    ``(name, pages an op reads at once)`` (:func:`_pages_each_op_reads`: a weight, or a linear's
    weight and bias together): an op faults in the pages it reads together, so a weight larger than
    the tier could never be read (a float matmul does not run a piece at a time: its order of
    additions may change with the piece's shape).

    Raises:
        DeviceTierFullError: naming the largest such weight, its pages and ``vram_limit``.
    """
    if not weights:
        return
    name, pages = max(weights, key=lambda weight: weight[1])
    page_size = pager.page_size
    capacity = pager.device_tier.capacity_pages
    if pages > capacity:
        raise DeviceTierFullError(
            f"page_weights=True: an op reads {name}'s {pages} pages of {format_size(page_size)} "
            f"({format_size(pages * page_size)}) at once, but vram_limit={pager.config.vram_limit} bytes hold {capacity} pages; "
            f"raise vram_limit above {format_size(pages * page_size)} (and the keys and values a step reads beside it)"
        )


def _pages_each_op_reads(layers: list, page_size: int) -> list[tuple[str, int]]:
    """``(name, pages)`` for what one op reads at once of the parameters of ``layers`` that
    :func:`_page_layer_weights` pages (a page or more, or paged already), for
    :func:`check_device_holds_each_weight`: each parameter alone (:func:`_pages_read_at_once`), but
    those of a module whose forward is one op on all of them (:func:`_reads_its_parameters_at_once`:
    a linear's ``addmm`` reads a paged bias beside its weight) together, named
    ``layers.0.mlp.gate_proj.weight and .bias``."""
    reads: list[tuple[str, int]] = []
    for prefix, module, to_page in _parameters_to_page(layers, page_size):
        paged = [(name, _pages_read_at_once(module, parameter, page_size)) for name, parameter in to_page]
        if len(paged) > 1 and _reads_its_parameters_at_once(module):
            reads.append((prefix + " and .".join(name for name, _ in paged), sum(pages for _, pages in paged)))
        else:
            reads.extend((prefix + name, pages) for name, pages in paged)
    return reads


def _parameters_to_page(layers: list, page_size: int) -> Iterator[tuple[str, torch.nn.Module, list[tuple[str, torch.Tensor]]]]:
    """Each module of ``layers`` with the parameters :func:`_page_layer_weights` pages (a page or
    more, or paged already): ``(name prefix such as "layers.0.mlp.gate_proj.", module, [(name,
    parameter), ...])``; a parameter several modules hold comes with each."""
    from pagedtensor.tensor import PagedTensor

    for index, layer in enumerate(layers):
        for module_name, module in layer.named_modules():
            to_page = [
                (name, parameter)
                for name, parameter in module._parameters.items()
                if parameter is not None and (isinstance(parameter, PagedTensor) or pages_as_weight(parameter, page_size))
            ]
            if to_page:
                yield f"layers.{index}.{module_name + '.' if module_name else ''}", module, to_page


def _reads_its_parameters_at_once(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward is one op on its weight and bias together: ``nn.Linear``'s
    (``F.linear``: ``addmm``), transformers' ``Conv1D`` (GPT-2: ``addmm``), ``nn.LayerNorm``'s and
    ``nn.Conv1d``'s, and their subclasses that keep that forward (Falcon's ``FalconLinear`` adds its
    bias after the matmul: a second op)."""
    from transformers.pytorch_utils import Conv1D

    return type(module).forward in (torch.nn.Linear.forward, Conv1D.forward, torch.nn.LayerNorm.forward, torch.nn.Conv1d.forward)


def _pages_read_at_once(module: torch.nn.Module, parameter: torch.Tensor, page_size: int) -> int:
    """The pages of ``parameter`` (paged from the start of a page) an op reads together: the whole
    weight's, or of a routed experts' stack (:func:`routed_expert_stack`) the most one expert's
    matrix spans. A matrix whose bytes are not a whole number of pages starts mid-page in some
    experts, and spans one page more there than its bytes fill (counted by bytes, a tier the
    check passed failed mid-generate on such an expert)."""
    nbytes = parameter.numel() * parameter.element_size()
    if not routed_expert_stack(module, parameter):
        return -(-nbytes // page_size)
    matrix = nbytes // parameter.shape[0]
    if matrix == 0:
        return 0
    return max((start + matrix - 1) // page_size - start // page_size + 1 for start in range(0, nbytes, matrix))


def _write_back_weight(pager: Pager, allocation: Allocation) -> None:
    """Give the pages of a weight just paged that are still on the device their host copies now
    (:meth:`Pager.write_back`): a weight never changes, so once every page has a lower copy no
    eviction of a weight copies it back, and the host tier grows its slabs here rather than in the
    middle of a generate. Where the host tier has no room for them but by dropping the host copy
    of another weight still on the device (and the disk tier none to spill it to), the pages stay
    as they are and are written back when evicted, as any page: no copy made here is wasted."""
    try:
        written = pager.write_back(allocation)
    except SlabAllocationError as error:  # the machine lacks the host memory host_memory promises: say so now
        log.warning("weights %s: not written back: %s", allocation.name, error)
        return
    if written < allocation.num_pages and any(info.tier == "device" and info.dirty for info in pager.page_table(allocation)):
        log.info("weights %s: the host tier has no room to write them back now", allocation.name)


@run_outside_compile
def _paged_linear_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` of a decoder layer's linear with a paged weight, set on the module by
    :func:`_page_layer_weights`: :func:`~pagedtensor.handlers.linear.paged_linear` reads the weight's
    pinned pages directly, without the two dispatches (``t``, then ``mm``) that ``F.linear`` on a
    PagedTensor takes; the same bits."""
    return paged_linear(input, self.weight, self.bias)


@run_outside_compile
def _paged_conv1d_forward(self: torch.nn.Module, input: torch.Tensor) -> torch.Tensor:
    """transformers' ``Conv1D.forward`` (GPT-2's linear, its weight stored transposed) with a paged
    weight, set on the module by :func:`_page_layer_weights`: :func:`~pagedtensor.handlers.linear.paged_conv1d`
    reads the weight's pinned pages directly, as :func:`_paged_linear_forward` does; the same bits."""
    return paged_conv1d(input, self.weight, self.bias)


@run_outside_compile
def _paged_falcon_linear_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """Falcon's ``FalconLinear.forward`` (``input @ weight.T``, then ``+ bias``: not ``F.linear``'s
    fused ``addmm``) with a paged weight: ``paged_linear`` without a bias runs that same matmul on
    the weight's pinned pages, and the bias is added after, as Falcon adds it; the same bits."""
    hidden_states = paged_linear(input, self.weight)
    return hidden_states if self.bias is None else hidden_states + self.bias


def _paged_forwards() -> dict[type, Any]:
    """The module types whose forward :func:`_page_layer_weights` replaces once their weight is paged
    (exactly these types: a subclass may compute otherwise), each with its replacement."""
    from transformers.models.falcon.modeling_falcon import FalconLinear
    from transformers.pytorch_utils import Conv1D

    return {torch.nn.Linear: _paged_linear_forward, Conv1D: _paged_conv1d_forward, FalconLinear: _paged_falcon_linear_forward}


def pages_as_weight(parameter: torch.Tensor, page_size: int) -> bool:
    """Whether ``page_weights=True`` pages a decoder layer's ``parameter``: those smaller than one
    page (norms) stay dense, since a page each would take a page of the budget and a page-sized
    copy at each fault-in."""
    return parameter.numel() * parameter.element_size() >= page_size


def routed_expert_stack(module: torch.nn.Module, parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` of ``module`` stacks one matrix per expert of a mixture-of-experts layer
    along dim 0 (as transformers' ``*Experts`` modules hold them, with ``num_experts``) and the
    module is given the routing (its ``forward`` takes more than the hidden states: the experts'
    indices, or their row counts): a token reads only the experts it is routed to
    (:func:`~pagedtensor.handlers.grouped_mm.grouped_mm_of_routed_experts` faults in only those),
    one expert's matrix at a time, so such a stack is neither prefetched nor advised ``"loop"``. A
    module given the hidden states alone (Llama 4's text experts: one ``bmm`` over every expert)
    reads its stacks whole, as any weight."""
    experts = getattr(module, "num_experts", None)
    if not (isinstance(experts, int) and parameter.dim() >= 3 and parameter.shape[0] == experts):
        return False
    return _takes_the_routing(type(module))


@functools.lru_cache(maxsize=None)
def _takes_the_routing(module_class: type) -> bool:
    """Whether ``module_class.forward`` takes arguments beyond the hidden states (transformers'
    experts-implementation wrapper keeps the signature of the forward it wraps)."""
    try:
        parameters = list(inspect.signature(module_class.forward).parameters.values())[1:]  # past self
    except (TypeError, ValueError):  # no signature to read: taken as routed, as before
        return True
    return len(parameters) > 1 or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def _weight_allocations(layer: torch.nn.Module, pager: Pager, routed_experts: bool = True) -> list:
    """The allocations of ``layer``'s PagedTensor parameters on ``pager``; with ``routed_experts``
    false, but those of experts' stacks (:func:`routed_expert_stack`): the weights the layer reads
    whatever the token."""
    from pagedtensor.tensor import PagedTensor

    return [
        parameter.allocation
        for module in layer.modules()
        for parameter in module._parameters.values()
        if isinstance(parameter, PagedTensor) and parameter.pager is pager and parameter.allocation is not None
        and (routed_experts or not routed_expert_stack(module, parameter))
    ]  # fmt: skip


class _PrefetchHook:
    """A forward pre-hook that prefetches the ``upcoming`` layer's weights to the device tier, but
    the experts of a mixture-of-experts layer (which of them a token reads is known only there), as
    far as they fit beside the weights of the layer about to run.
    (The layers' hooks hold the next layer by a weak reference: the last one's names the first; a
    deep copy of a layer shares its hook, which does nothing once that layer is gone.)

    The allocations are looked up again whenever one of those last seen is freed: ``model.to(dtype)``
    or ``model.half()`` replaces every paged weight with a new one. ``pickle`` (``torch.save`` of a
    layer) saves no hook: the pager is not saved.
    """

    def __init__(self, pager: Pager, upcoming: "weakref.ref[torch.nn.Module]") -> None:
        self.pager, self.upcoming, self.allocations, self.running = pager, upcoming, [], []

    @run_outside_compile
    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        pager, upcoming = self.pager, self.upcoming()
        if pager.closed or upcoming is None:
            return
        if not self.allocations or any(allocation.freed for allocation in (*self.allocations, *self.running)):
            self.allocations = _weight_allocations(upcoming, pager, routed_experts=False)
            self.running = _weight_allocations(module, pager, routed_experts=False)
        # Weights already on the device are left out (each weight is one allocation, faulted in
        # whole); the rest go as one batch, so that they land in adjacent slots. Only the weights,
        # in order, that the device tier holds beside those of the layer about to run (its experts
        # aside, faulted as tokens pick them): a prefetch past that would evict pages of that layer
        # (read again by its forward) or of its own batch. (Neither the experts a token picks nor
        # the layer's KV pages are counted: a long context or a tier of about one MoE layer can still
        # take back what was prefetched.)
        room = pager.device_tier.capacity_pages - sum(allocation.num_pages for allocation in self.running)
        missing = []
        for allocation in self.allocations:
            room -= allocation.num_pages
            if room < 0:
                break
            if any(page.device_slot is None for page in allocation.pages):
                missing.append(allocation)
        if missing:
            pager.prefetch_together(missing)

    def __reduce__(self) -> tuple:
        return _no_prefetch_hook, ()


def _no_prefetch_hook() -> Any:
    """What a pickled :class:`_PrefetchHook` loads as: :func:`_no_prefetch`."""
    return _no_prefetch


def _no_prefetch(module: torch.nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing."""


def _final_norm(decoder: Optional[torch.nn.Module]) -> Optional[torch.nn.Module]:
    """The norm the decoder layers' output goes through: the last-registered child of ``decoder``
    (:func:`_decoder_module`, the module holding the layers' ``nn.ModuleList``) whose class name
    ends in ``Norm`` (``norm``: Llama and most; ``ln_f``: GPT-2, GPT-J, Falcon, and Bloom, whose
    embedding LayerNorm is registered before it; ``final_layer_norm``: GPT-NeoX, and OPT, which
    registers it before its layers; ``norm_f``: MPT). ``None`` if there is none (no layers found,
    or the model ends otherwise)."""
    norms = [child for child in decoder.children() if type(child).__name__.endswith("Norm")] if decoder is not None else []
    return norms[-1] if norms else None


def _move_dense_tensors(model: torch.nn.Module, device: torch.device, pager: Pager) -> None:
    """Move ``model``'s parameters and buffers that are neither PagedTensors nor on ``device`` there,
    as ``model.to(device)`` moves them: a parameter takes the moved data in place (between the CPU
    and a GPU), or else is replaced by a new parameter in every module that holds it, so ties
    (``lm_head`` to the embedding) hold either way; its gradient moves along; a buffer is replaced.
    A PagedTensor of another pager (an embedding paged by hand) is copied onto ``pager`` and replaced
    alike: under its budgets and freed with it. Where a move raises (the device's memory, the
    pager's tiers), every tensor moved so far goes back where it was."""
    from pagedtensor.tensor import PagedTensor

    def stays(tensor: torch.Tensor) -> bool:
        if isinstance(tensor, PagedTensor):
            return tensor.pager is pager
        return normalize_device(tensor.device) == device

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, PagedTensor):
            return PagedTensor.wrap(tensor.detach(), pager)
        return tensor.to(device)

    moved_in_place: list[tuple[torch.nn.Parameter, torch.Tensor, Optional[torch.Tensor]]] = []
    replacements: dict[int, torch.nn.Parameter] = {}  # id of a parameter -> the one in its place
    replaced: list[tuple[dict, str, torch.Tensor]] = []  # (a module's _parameters or _buffers, name, the tensor it held)
    try:
        with torch.no_grad():
            for module in model.modules():
                for name, parameter in list(module._parameters.items()):
                    if parameter is None or stays(parameter):
                        continue
                    new = replacements.get(id(parameter))
                    if new is None:
                        data = moved(parameter.data)
                        grad = parameter.grad.to(device) if parameter.grad is not None else None
                        if not isinstance(data, PagedTensor) and torch._has_compatible_shallow_copy_type(parameter.data, data):
                            moved_in_place.append((parameter, parameter.data, parameter.grad))
                            parameter.data = data
                            parameter.grad = grad
                            continue
                        new = replacements[id(parameter)] = torch.nn.Parameter(data, requires_grad=parameter.requires_grad)
                        new.grad = grad
                    replaced.append((module._parameters, name, parameter))
                    module._parameters[name] = new
                for name, buffer in list(module._buffers.items()):
                    if buffer is None or stays(buffer):
                        continue
                    replaced.append((module._buffers, name, buffer))
                    module._buffers[name] = moved(buffer)
    except BaseException:
        with torch.no_grad():
            for parameter, data, grad in moved_in_place:
                parameter.data = data
                parameter.grad = grad
        for holder, name, tensor in replaced:
            holder[name] = tensor
        raise


def _model_device(model: torch.nn.Module) -> Optional[torch.device]:
    for parameter in model.parameters():
        return normalize_device(parameter.device)
    return None


# Layer types whose cache is keys and values (transformers' ``config.layer_types``), and those of
# them the paged kernels compute (chunked attention, Llama 4's, attends within fixed blocks of tokens).
KV_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
KERNEL_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def _text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _refuse_cross_attention(module: torch.nn.Module, kwargs: dict) -> None:
    """Raise for a forward with encoder states (``encoder_outputs``, ``encoder_hidden_states``) and a
    paged cache: a decoder of an encoder-decoder model loaded alone (``WhisperForCausalLM``,
    ``BartForCausalLM``, ``BertLMHeadModel``; their config says ``is_encoder_decoder=False``) stores
    its cross-attention keys and values in the same cache layer as its own, which transformers
    keeps apart only in an ``EncoderDecoderCache`` (the paged layer held both: other logits)."""
    for name in ("encoder_outputs", "encoder_hidden_states"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"enable_paging: {type(module).__name__} was given {name}: its cross-attention keys and values would go "
                "into the paged cache beside its own, which pages self-attention only. Run it without paging, or "
                "without encoder states"
            )


def _kv_cache_unsupported(model: torch.nn.Module) -> Optional[str]:
    """Why a paged KV cache cannot serve ``model`` (encoder-decoder, layers keeping other state), or None."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "is an encoder-decoder model (config.is_encoder_decoder): its cross-attention keys and values are not paged"
    supports_cache = getattr(type(model), "_supports_default_dynamic_cache", None)
    if supports_cache is not None and not supports_cache():
        return ("keeps a recurrent state or a cache of its own (transformers gives it no Cache: "
                "_supports_default_dynamic_cache() is False, as for RWKV, xLSTM, Reformer, XLNet), not keys and values in a Cache")
    if getattr(model, "_is_stateful", False):  # transformers before 5.25; from 5.25 such models name their layers "linear_attention"
        return "keeps a recurrent state (a stateful model: Mamba, RWKV, xLSTM, Jamba, ...), not keys and values alone"
    if not _takes_a_cache(model):
        return ("takes no cache (neither its forward nor its prepare_inputs_for_generation has a cache or past_key_values "
                "argument, as OpenAI GPT: it computes every position's keys again at each step), so it has none to page")
    config = _text_config(model)
    other = sorted(set(getattr(config, "layer_types", None) or ()) - KV_LAYER_TYPES)
    if other:
        return f"has layers of type {other} (config.layer_types), whose state is not keys and values"
    cross = getattr(config, "cross_attention_layers", None)
    if cross:
        return f"has cross-attention layers {list(cross)} (config.cross_attention_layers), whose keys and values come from another input, not the paged cache"
    return None


def _takes_a_cache(model: torch.nn.Module) -> bool:
    """Whether ``generate`` can hand ``model`` a cache: a transformers model takes one by name in its
    ``forward`` or its ``prepare_inputs_for_generation`` (what generate's check of its model kwargs
    reads); any other module (a wrapper of one) is taken to pass it on."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return True
    names = set(inspect.signature(type(model).forward).parameters)
    names |= set(inspect.signature(model.prepare_inputs_for_generation).parameters)
    return bool(names & {"cache", "past_key_values"})


def _uses_attention_interface(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes its attention from transformers' attention interface: it says so
    (``_supports_attention_backend``, set by models written for it, remote code included), or
    transformers finds the interface in its source (``_can_set_attn_implementation``)."""
    if getattr(model, "_supports_attention_backend", False):
        return True
    can_switch = getattr(type(model), "_can_set_attn_implementation", None)
    return can_switch is None or bool(can_switch())


def _paged_attention_unsupported(model: torch.nn.Module) -> Optional[str]:
    """Why the ``"pagedllm"`` attention cannot serve ``model``, or None: the model must take its
    attention from transformers' attention interface, and every layer be full or sliding-window attention."""
    if not _uses_attention_interface(model):
        return "does not take its attention from transformers' attention interface, so it cannot switch to it"
    config = _text_config(model)
    other = sorted(set(getattr(config, "layer_types", None) or ()) - KERNEL_LAYER_TYPES)
    if other:
        return f"has layers of type {other} (config.layer_types), which the paged kernels do not compute"
    if getattr(config, "attention_chunk_size", None):
        return f"uses chunked attention (attention_chunk_size={config.attention_chunk_size}), which the paged kernels do not compute"
    if getattr(config, "alibi", False):
        return ("adds ALiBi position biases to its attention mask (config.alibi, as Falcon's attention from transformers 5.25), "
                "and the paged kernels compute causal attention without a bias")
    if getattr(config, "use_bidirectional_attention", False):
        return "attends bidirectionally (config.use_bidirectional_attention), and the paged kernels are causal"
    if getattr(config, "num_kv_shared_layers", 0):
        return (f"shares keys and values across layers (num_kv_shared_layers={config.num_kv_shared_layers}): its later "
                f"layers read the keys an earlier layer's attention call returns, and the paged attention returns only the new ones")  # fmt: skip
    if getattr(config, "kv_lora_rank", None):
        return (f"caches compressed latents (config.kv_lora_rank={config.kv_lora_rank}: multi-head latent attention) and "
                f"expands them into the keys and values it attends to, which the paged kernels never see")  # fmt: skip
    if getattr(config, "model_type", None) == "jetmoe":
        return ("is a mixture of attention heads (JetMoE): it repeats the keys the cache returns for each expert a token is "
                "routed to, keys the paged kernels never see")  # fmt: skip
    if _declares_flash_attention_unsupported(model):
        return ("does not support flash attention (_supports_flash_attn is False: masks beyond causal, padding and "
                "sliding window, as PaliGemma's two-way prefix, or attention of another form), and the paged kernels are flash attention")  # fmt: skip
    return None


def _declares_flash_attention_unsupported(model: torch.nn.Module) -> bool:
    """Whether the model does not support flash attention: ``_supports_flash_attn`` is False (set by
    the model, or transformers' ``PreTrainedModel`` default, which GIT keeps: its attention gave
    other tokens under the paged kernels) and the older ``_supports_flash_attn_2`` is not True (set
    by remote code written before the newer flag)."""
    return getattr(type(model), "_supports_flash_attn", False) is False and not getattr(type(model), "_supports_flash_attn_2", False)


def _attention_settings(model: torch.nn.Module) -> list[tuple[Any, Any]]:
    """Every config of ``model`` (its own, its sub-models', their sub-configs, at any depth) with
    the attention implementation it holds, to put back with :func:`_restore_attention_settings`."""
    found: dict[int, Any] = {}
    pending = [model.config] + [module.config for module in model.modules() if module is not model and hasattr(module, "_can_set_attn_implementation")]
    while pending:
        config = pending.pop()
        if id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        pending.extend(sub for key in (getattr(config, "sub_configs", None) or {}) if (sub := getattr(config, key, None)) is not None)
    return [(config, config._attn_implementation_internal) for config in found.values()]


def _restore_attention_settings(settings: list[tuple[Any, Any]]) -> None:
    """Put back what :func:`_attention_settings` saw, config by config (a multimodal model's
    towers may each have had their own)."""
    for config, implementation in settings:
        config._attn_implementation_internal = implementation


def _keep_other_towers_attention(model: torch.nn.Module, settings: list[tuple[Any, Any]]) -> None:
    """After a switch to ``"pagedllm"``, which transformers applies to every sub-config: the configs
    other than the model's own and its text config (vision or audio towers, which fill no cache)
    get back the attention they had."""
    paged = {id(model.config), id(_text_config(model))}
    _restore_attention_settings([(config, implementation) for config, implementation in settings if id(config) not in paged])


def _set_attn_implementation(model: torch.nn.Module, name: str) -> str:
    """Switch ``model`` to the attention ``name``; returns the name its config now holds, which
    transformers' setter may spell otherwise (it stores ``"paged|sdpa"`` as ``"sdpa"``, as its
    ``from_pretrained`` does). ValueError if the model refuses and does not take its attention from
    the interface (transformers then only warns, and a model whose attention modules ignore the
    setting would run with it half-set). A model that declares it uses the interface but whose
    source transformers cannot read (remote code) gets the config set directly."""
    setter = getattr(model, "set_attn_implementation", None)
    can_switch = getattr(type(model), "_can_set_attn_implementation", None)
    if setter is not None and (can_switch is None or can_switch()):
        setter(name)
        if can_switch is not None:  # transformers checked the name (raising if the model cannot take it) and stored its own spelling
            return model.config._attn_implementation
    elif setter is None or getattr(model, "_supports_attention_backend", False):
        model.config._attn_implementation = name  # what the setter does, without its reading of the source
    if model.config._attn_implementation != name:
        raise ValueError(
            f"attn_implementation={name!r}: {type(model).__name__} keeps {model.config._attn_implementation!r} "
            f"(it cannot switch its attention once loaded): load it with attn_implementation={name!r} or pass \"auto\""
        )
    return name


# ---------------------------------------------------------------------- measuring


@dataclasses.dataclass
class GenerationMeasurement:
    """``generate``'s usual output plus what one measured call took."""

    output: Any
    sequences: torch.Tensor
    new_tokens: int
    time_to_first_token_s: float
    tokens_per_second: Optional[float]  # decode rate after the first token, of one sequence (a batch of n decodes n times as many)
    total_s: float
    peak_memory_gb: Optional[float]  # GiB (2**30 bytes) of CUDA memory allocated at peak; None on CPU
    paging: dict = dataclasses.field(default_factory=dict)
    # Times the CUDA caching allocator hit its limit, freed its cache and retried during the call (each
    # retry synchronizes the device: a sign that the budget leaves the allocator too little room); None on CPU.
    allocator_retries: Optional[int] = None

    def __getattr__(self, name: str) -> Any:  # behave like the wrapped output for its fields
        if name == "output" or (name.startswith("__") and name.endswith("__")):  # copy and pickle look up dunders
            raise AttributeError(name)
        return getattr(self.output, name)


def measure_generate(model: torch.nn.Module, *args, pager: Optional[Pager] = None, **kwargs) -> GenerationMeasurement:
    """Run ``model.generate(*args, **kwargs)`` and measure time to first token, decode tokens/s,
    peak CUDA memory and (with a ``pager``) the bytes the pager moved per decoded token.

    The first token is timed when the forward of ``model`` that ends its prefill returns (its logits
    synchronized on CUDA), by a forward hook for the call's length: the first whose forwards so far
    took the prompt's tokens not in a cache given (``cache=``/``past_key_values=``), the first forward
    itself unless transformers prefills in chunks (``prefill_chunk_size``) (a logits processor would also run for an assistant's candidates,
    before the model's prefill)."""
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    prompt_len = inputs.shape[1] if isinstance(inputs, torch.Tensor) else 0
    given_cache = next((kwargs[name] for name in ("cache", "past_key_values") if kwargs.get(name) is not None), None)
    cached = given_cache.get_seq_length() if hasattr(given_cache, "get_seq_length") else 0
    to_prefill = max(1, prompt_len - cached)  # a cache given with the prompt's start: only the rest is forwarded
    device = _model_device(model)
    cuda = torch.cuda.is_available() and device is not None and device.type == "cuda"  # then measured on that device
    marks: dict[str, Any] = {}

    def first_token() -> None:
        marks["first"] = time.perf_counter()
        if pager is not None:
            marks["stats"] = pager.stats()

    def first_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if "first" in marks:
            return
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        marks["prefilled"] = marks.get("prefilled", 0) + (tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.dim() > 1 else prompt_len)
        if marks["prefilled"] < to_prefill:  # a chunk of the prompt: its first token comes later
            return
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        first_token()

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        retries_before = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
    before = pager.stats() if pager is not None else None
    hook = model.register_forward_hook(first_forward, with_kwargs=True)
    start = time.perf_counter()
    try:
        output = model.generate(*args, **kwargs)
    finally:
        hook.remove()
    if cuda:
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new_tokens = sequences.shape[1] - prompt_len
    first = marks.get("first", end)
    paging: dict = {}
    if pager is not None:
        after = pager.stats()
        at_first = marks.get("stats", after)
        decoded = max(1, new_tokens - 1)
        paging = {
            "prefill": {key: at_first[key] - before[key] for key in ("bytes_h2d", "bytes_d2h", "bytes_to_disk", "bytes_from_disk", "evictions", "faults")},
            "decode": {key: after[key] - at_first[key] for key in ("bytes_h2d", "bytes_d2h", "bytes_to_disk", "bytes_from_disk", "evictions", "faults")},
            "bytes_h2d_per_token": (after["bytes_h2d"] - at_first["bytes_h2d"]) / decoded,
            "resident_bytes_at_first_token": at_first["resident_bytes"],
            "resident_bytes": after["resident_bytes"],
        }
    return GenerationMeasurement(
        output=output,
        sequences=sequences,
        new_tokens=new_tokens,
        time_to_first_token_s=first - start,
        tokens_per_second=(new_tokens - 1) / (end - first) if new_tokens > 1 and end > first else None,
        total_s=end - start,
        peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        paging=paging,
        allocator_retries=torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries_before if cuda else None,
    )


# ---------------------------------------------------------------------- PagedModel


def _paging_option_names() -> list[str]:
    """The options of :func:`enable_paging` that ``paging`` takes (not ``pager`` nor ``memory_config``)."""
    return [name for name in inspect.signature(enable_paging).parameters if name not in ("model", "memory_config", "pager")]


def _returning_wrapper(method: Any, wrapper: Any) -> Any:
    """``method`` (bound to the wrapped model) giving ``wrapper`` where it returns the model."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        return wrapper if result is method.__self__ else result

    return call


def _check_paging_dict(memory_config: Optional[MemoryConfig], paging: Optional[dict]) -> None:
    """``PagedModel.from_pretrained``'s ``paging``: a dict of :func:`enable_paging` options (not
    ``pager`` nor ``memory_config``, which from_pretrained takes itself), each checked."""
    paging = {} if paging is None else paging
    if not isinstance(paging, dict):
        raise TypeError(f"paging: expected a dict of enable_paging options, got {type(paging).__name__}")
    signature = inspect.signature(enable_paging)
    options = _paging_option_names()
    unknown = sorted(str(key) for key in paging if key not in options)
    if unknown:
        raise TypeError(f"paging: unknown option(s) {unknown}; enable_paging's options are {options}")
    arguments = signature.bind(None, memory_config, **paging)  # enable_paging's defaults where not given
    arguments.apply_defaults()
    check_paging_options(**{name: value for name, value in arguments.arguments.items() if name != "model"})


class PagedModel:
    """A transformers causal LM with paging enabled, plus its tokenizer and pager.

    Attribute access falls through to the wrapped model; ``generate`` is the model's (paged), with
    ``measure_memory=True`` returning a :class:`GenerationMeasurement` (the usual output in
    ``.output``/``.sequences``, plus ``peak_memory_gb``, ``tokens_per_second`` and
    ``time_to_first_token_s``).
    """

    def __init__(self, model: torch.nn.Module, memory_config: Optional[MemoryConfig] = None, *, tokenizer: Any = None, **paging: Any) -> None:
        if paging_state(model) is None:
            enable_paging(model, memory_config, **paging)
        elif memory_config is not None or paging:
            raise ValueError("PagedModel: the model already has paging enabled; pass neither memory_config nor paging options")
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        memory_config: Optional[MemoryConfig] = None,
        *,
        gguf_file: Optional[str] = None,
        dtype: Any = None,
        load_tokenizer: bool = True,
        tokenizer: Any = None,
        paging: Optional[dict] = None,
        **hf_kwargs: Any,
    ) -> "PagedModel":
        """Load ``name_or_path`` with ``AutoModelForCausalLM`` (a GGUF file with ``gguf_file=``), move it
        to the pager's device and enable paging. ``paging`` holds :func:`enable_paging` options; with
        ``"page_weights": True`` the loaded model stays where it loaded (the CPU, unless ``device_map``
        says otherwise): its layers' weights are paged from there and only the rest moves. A
        ``device_map`` that has accelerate dispatch the model (over several devices, or offloading
        to the CPU or disk) is refused once loaded: its hooks would move the weights at every forward.
        With ``tp_plan="auto"`` (under ``torchrun``): this rank's tensor-parallel shard, paged with
        ``memory_config`` as this rank's own budget (:func:`pagedtensor.hf.distributed.load_tensor_parallel`).
        ``attn_implementation`` is the paged model's (as ``paging={"attn_implementation": ...}``; ``None``,
        transformers' default, is as none given: ``"auto"``); a
        ``tokenizer`` given is used instead of loading one. enable_paging's other options go in
        ``paging`` only (as keywords they would reach the model's constructor)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        misplaced = sorted(name for name in hf_kwargs if name in _paging_option_names() and name != "attn_implementation")
        if misplaced:
            raise TypeError(f"PagedModel.from_pretrained: enable_paging option(s) {misplaced} go in paging={{...}}; "
                            "the other keywords go to transformers' from_pretrained")  # fmt: skip
        if paging is not None and not isinstance(paging, dict):
            _check_paging_dict(memory_config, paging)  # its TypeError, before the merge below reads it
        if hf_kwargs.get("attn_implementation", "") is None:  # transformers' default: as if not given
            del hf_kwargs["attn_implementation"]
        if "attn_implementation" in hf_kwargs:
            # The model's attention is enable_paging's, whose "auto" would switch it to the kernels: the
            # same as paging={"attn_implementation": ...}. transformers loads it with the same one (but
            # "pagedllm", which it knows only once registered: enable_paging sets it, and "auto", which
            # it does not know: the model loads with its default, as when none is given).
            attention = hf_kwargs["attn_implementation"]
            given = (paging or {}).get("attn_implementation", attention)
            if given != attention:
                raise ValueError(f"attn_implementation={attention!r} and paging's attn_implementation={given!r} disagree; give one")
            paging = {**(paging or {}), "attn_implementation": attention}
            if attention in (ATTENTION_NAME, "auto"):
                del hf_kwargs["attn_implementation"]
        _check_paging_dict(memory_config, paging)  # before loading gigabytes of weights
        if hf_kwargs.get("tp_plan") is not None:  # tensor parallel under torchrun: one pager per rank
            from pagedtensor.hf.distributed import load_tensor_parallel

            if gguf_file is not None:
                hf_kwargs["gguf_file"] = gguf_file
            return load_tensor_parallel(name_or_path, memory_config, dtype=dtype, load_tokenizer=load_tokenizer, tokenizer=tokenizer,
                                        paging=paging, **hf_kwargs)
        config = memory_config if memory_config is not None else MemoryConfig()
        if gguf_file is not None:
            hf_kwargs["gguf_file"] = gguf_file
        if dtype is not None:
            hf_kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **hf_kwargs)
        _refuse_accelerate_dispatch(model, "PagedModel.from_pretrained")  # before model.to, which accelerate refuses less clearly
        if not (paging or {}).get("page_weights"):
            model.to(config.device)  # else enable_paging pages the layers' weights from the CPU and moves only the rest
        model.eval()
        if load_tokenizer and tokenizer is None:
            tokenizer_kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
            try:
                tokenizer = AutoTokenizer.from_pretrained(name_or_path, **tokenizer_kwargs)
            except (OSError, ValueError) as error:
                log.warning("PagedModel.from_pretrained: no tokenizer for %s (%s)", name_or_path, error)
        return cls(model, config, tokenizer=tokenizer, **(paging or {}))

    @property
    def pager(self) -> Pager:
        return paging_state(self.model).pager

    def generate(self, *args: Any, measure_memory: bool = False, **kwargs: Any) -> Any:
        """``model.generate`` with a paged KV cache; see the class docstring for ``measure_memory``."""
        if not measure_memory:
            return self.model.generate(*args, **kwargs)
        return measure_generate(self.model, *args, pager=self.pager, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "tokenizer"):
            raise AttributeError(name)
        value = getattr(self.model, name)
        if inspect.ismethod(value) and value.__self__ is self.model:
            return _returning_wrapper(value, self)  # model.eval() returns the model: paged.eval() returns paged
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        """``model`` and ``tokenizer`` are the wrapper's own; any other attribute is the model's
        (``paged.generation_config = ...`` is what the model's generate reads)."""
        if name in ("model", "tokenizer"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.model, name, value)

    def __delattr__(self, name: str) -> None:
        if name in ("model", "tokenizer"):
            object.__delattr__(self, name)
        else:
            delattr(self.model, name)

    def close(self) -> None:
        """Close the pager (free every tier). The model cannot generate with paging afterwards."""
        self.pager.close()

    def __enter__(self) -> "PagedModel":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PagedModel({type(self.model).__name__}, pager={self.pager.config})"
