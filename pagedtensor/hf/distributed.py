"""Tensor-parallel paged inference on ``torch.distributed``: one pager and one budget per rank.

A tensor-parallel model splits every attention layer by heads: rank ``r`` of ``world`` holds
``num_attention_heads / world`` query heads and ``num_key_value_heads / world`` KV heads (column-
parallel q/k/v and gate/up projections, row-parallel o/down projections whose partial outputs are
summed with an all-reduce). Its :class:`~pagedtensor.hf.cache.PagedKVCache` therefore pages only the
rank's own KV heads: the cache takes its geometry from the key states the layer hands it, which
are already the local heads. Each rank owns its :class:`~pagedtensor.pager.Pager`, built from its
own :class:`~pagedtensor.config.MemoryConfig` (``vram_limit`` is a per-GPU budget), on device
``cuda:{local_rank}`` (or ``cpu``). Paging itself needs no collective: every rank sees the same
token stream, so every rank makes the same paging decisions on its own pages.

Two ways to shard the weights:

* :func:`load_tensor_parallel` (or :func:`enable_tensor_parallel_paging` on a model already loaded
  with ``tp_plan="auto"``): transformers' own plan, weights as DTensors. Checked on the CPU with
  gloo on transformers 5.24 (``DistributedConfig(tp_plan="auto")``); on 5.17 the ``tp_plan="auto"``
  keyword is used.
* :func:`shard_by_heads`: the same split done here on a model built in every process (same seed),
  with plain tensors and ``torch.distributed.all_reduce`` after the row-parallel projections. No
  checkpoint needed: the benchmark uses it for random weights. Llama, Mistral, Qwen2, Gemma layouts
  (separate q/k/v and gate/up projections).

Usage under ``torchrun --nproc-per-node N``::

    from pagedtensor import MemoryConfig
    from pagedtensor.hf.distributed import load_tensor_parallel

    model = load_tensor_parallel("meta-llama/Llama-2-7b-hf", MemoryConfig(vram_limit="12GiB"), dtype=torch.float16)
    out = model.generate(ids, max_new_tokens=32)   # every rank runs generate on the same inputs
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from pagedtensor.config import MemoryConfig, normalize_device
from pagedtensor.hf.model import PagedModel, enable_paging, paging_state
from pagedtensor.tensor import PagedTensor

log = logging.getLogger(__name__)

TENSOR_PARALLEL_ATTRIBUTE = "_pagedllm_tensor_parallel"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split output features
ROW_PARALLEL = ("o_proj", "down_proj")  # split input features, all-reduce the output
# Attention classes (by name, anywhere in the module's class hierarchy) whose heads are not independent
# until o_proj: sharded by heads, each rank would combine its own heads with each other instead.
HEAD_MIXING_ATTENTIONS = {
    "DiffLlamaAttention": "its differential attention pairs head i with head i + H/2 (torch.chunk over the head axis)",
}
# Environment every process of a multi-GPU run gets: NVLink multicast stays off on the lent machines.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """Where this process stands in a tensor-parallel run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


@dataclasses.dataclass(frozen=True)
class TensorParallelShard:
    """What :func:`shard_by_heads` (or a transformers ``tp_plan``) left on one rank (``model._pagedllm_tensor_parallel``)."""

    rank: int
    world_size: int
    local_heads: int
    local_kv_heads: int
    source: str  # "shard_by_heads" or "tp_plan"


# ---------------------------------------------------------------------- process group


def rank_info(group: Optional[Any] = None) -> RankInfo:
    """This process's rank, world size, local rank and device (``cuda:{local_rank}`` when CUDA is
    available and the backend is not gloo, else ``cpu``). Without an initialized process group:
    rank 0 of 1 (or what ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` say)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        backend = dist.get_backend(group)
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        backend = None
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    return RankInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def init_tensor_parallel(backend: Optional[str] = None) -> RankInfo:
    """Join the process group that ``torchrun`` (or the ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
    ``WORLD_SIZE`` variables) describes, if not joined yet: ``nccl`` with CUDA, else ``gloo``. Binds
    the process to ``cuda:{LOCAL_RANK}`` first."""
    if not dist.is_available():
        raise RuntimeError("init_tensor_parallel: torch.distributed is not available in this build of torch")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend: expected 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        for name, value in NCCL_SAFE_ENV.items():
            os.environ.setdefault(name, value)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return rank_info()


# ---------------------------------------------------------------------- validation


def _head_counts(config: Any) -> tuple[Any, Any]:
    """``(num_attention_heads, num_key_value_heads)`` of a model config's text config; the KV heads
    are the attention heads where the config names none (GPT-NeoX, GPT-J, GPT-2: no grouped query
    attention). Either is None where the config has no such field."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    return heads, getattr(text, "num_key_value_heads", None) or heads


def check_tensor_parallel_heads(config: Any, world_size: int) -> None:
    """Raise ``ValueError`` unless ``world_size`` divides both ``num_key_value_heads`` and ``num_attention_heads``."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    heads, kv_heads = _head_counts(config)
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        raise ValueError(f"config: expected num_attention_heads and num_key_value_heads, got {heads!r} and {kv_heads!r}")
    if kv_heads % world_size:
        raise ValueError(
            f"tensor parallel: world size {world_size} does not divide num_key_value_heads {kv_heads} "
            f"(KV pages are sharded by KV heads; use a world size that divides {kv_heads})"
        )
    if heads % world_size:
        raise ValueError(f"tensor parallel: world size {world_size} does not divide num_attention_heads {heads}")


def _head_dim(attention: torch.nn.Module, config: Any) -> int:
    """The head size of one attention module: its own ``head_dim`` (a layer of Gemma 4 has its own,
    and its config refuses one for all), else the config's."""
    head_dim = getattr(attention, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)  # a DTensor under transformers' tp_plan
    return to_local() if callable(to_local) else tensor


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module.self_attn for module in model.modules() if hasattr(getattr(module, "self_attn", None), "layer_idx")]


def _local_kv_heads(model: torch.nn.Module) -> Optional[int]:
    """KV heads this rank's first attention layer computes (from its k projection's local weight)."""
    for attention in _attention_modules(model):
        projection = getattr(attention, "k_proj", None)
        if isinstance(projection, torch.nn.Linear):
            return _local(projection.weight).shape[0] // _head_dim(attention, model.config)
    return None


# ---------------------------------------------------------------------- sharding without transformers' plan


def shard_by_heads(model: torch.nn.Module, group: Optional[Any] = None) -> torch.nn.Module:
    """Keep this rank's share of every decoder layer of ``model`` (identical in every rank); returns ``model``.

    Column-parallel (rows of the weight, and bias): q/k/v by whole heads, gate/up by equal slices of
    the intermediate size. Row-parallel (columns of the weight): o/down; their bias is kept aside and
    added once after the ``all_reduce`` (SUM over ``group``) that a forward hook runs on the
    output. Half-precision partials are summed in fp32 and rounded once. Embeddings, norms and the
    LM head stay replicated. Each layer's heads are counted with its own head size (its attention's
    ``head_dim``: Gemma 4's full-attention layers have another), and a layer whose attention sets
    ``v_proj`` to ``None`` (Gemma 4's ``attention_k_eq_v``: values are its keys) shards its keys only.
    Every layer is checked before any is changed: an error leaves the model as it was.

    Shard first, then page: ``enable_tensor_parallel_paging(model, ..., page_weights=True)`` pages
    the rank's shard. A model already sharded (here, or by transformers' ``tp_plan``: DTensor
    weights) or already paged is refused, and so is attention that combines heads with each other
    before ``o_proj`` (:data:`HEAD_MIXING_ATTENTIONS`: DiffLlama).

    Note:
        Every rank must run every forward (the all-reduce is a collective): call ``generate`` with
        the same inputs on every rank.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers model (a PreTrainedModel with a config), got {type(model).__name__}")
    if getattr(model, TENSOR_PARALLEL_ATTRIBUTE, None) is not None:
        raise ValueError("shard_by_heads: the model is already sharded")
    distributed = next((name for name, parameter in model.named_parameters() if _local(parameter) is not parameter), None)
    if distributed is not None:
        raise ValueError(f"shard_by_heads: the model is already sharded (its {distributed} is a DTensor: loaded with transformers' "
                         "tp_plan): page it with enable_tensor_parallel_paging as it is, or load it without tp_plan and shard it here "
                         "(needed for page_weights=True)")  # fmt: skip
    if paging_state(model) is not None or any(isinstance(parameter, PagedTensor) for parameter in model.parameters()):
        raise ValueError("shard_by_heads: paging is already enabled on the model (sharding would replace paged weights by dense "
                         "copies): call shard_by_heads first, then enable_tensor_parallel_paging(model, ..., page_weights=True)")  # fmt: skip
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_by_heads: torch.distributed is not initialized (call init_tensor_parallel first)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    config = model.config
    check_tensor_parallel_heads(config, world)
    heads, kv_heads = _head_counts(config)
    layers = [module for module in model.modules() if hasattr(getattr(module, "self_attn", None), "layer_idx")]
    if not layers:
        raise TypeError(f"shard_by_heads: {type(model).__name__} has no decoder layers with a self_attn")
    plans = [_layer_shards(layer, config, world) for layer in layers]
    for layer, (linears, layer_heads) in zip(layers, plans):
        attention = layer.self_attn
        for name, linear in linears.items():
            if name in ROW_PARALLEL:
                _split_columns(linear, rank, world, group)
            else:  # whole heads, or equal slices of the intermediate size: checked by _layer_shards
                _split_rows(linear, rank, world)
        for attribute, value in zip(("num_heads", "num_key_value_heads"), layer_heads):
            if isinstance(getattr(attention, attribute, None), int):
                setattr(attention, attribute, value // world)
    setattr(model, TENSOR_PARALLEL_ATTRIBUTE, TensorParallelShard(rank, world, heads // world, kv_heads // world, "shard_by_heads"))
    return model


def _layer_shards(layer: torch.nn.Module, config: Any, world: int) -> tuple[dict[str, torch.nn.Linear], tuple[int, int]]:
    """The projections of one decoder layer to split (by name) and its query and KV heads, after
    checking that ``world`` splits them: q/k/v into whole heads of the layer's own head size (its
    attention's ``head_dim``, else the config's), gate/up and o/down into equal slices. Changes nothing.

    Raises:
        TypeError: the attention mixes heads (:data:`HEAD_MIXING_ATTENTIONS`), the layer has no
            ``mlp``, or a projection is missing or not a Linear (fused layouts).
        ValueError: a projection is not whole heads, or ``world`` does not divide them.
    """
    attention, mlp = layer.self_attn, getattr(layer, "mlp", None)
    where = f"shard_by_heads: layer {attention.layer_idx}"
    supported = ("shard_by_heads splits attention whose heads are independent until o_proj, with separate q/k/v and gate/up "
                 "projections (Llama, Mistral, Qwen2, Gemma layouts)")  # fmt: skip
    mixing = next((cls.__name__ for cls in type(attention).__mro__ if cls.__name__ in HEAD_MIXING_ATTENTIONS), None)
    if mixing is not None:
        raise TypeError(f"{where}: {type(attention).__name__} mixes heads across the split: {HEAD_MIXING_ATTENTIONS[mixing]}, so "
                        f"each rank would combine only its own heads; {supported}; keep one process")  # fmt: skip
    if not isinstance(mlp, torch.nn.Module):
        children = ", ".join(name for name, _ in layer.named_children())
        raise TypeError(f"{where}: {type(layer).__name__} has no mlp module (its children: {children}; a mixture of experts?); "
                        f"{supported}; load with tp_plan='auto' for other models")  # fmt: skip
    owners = {"q_proj": attention, "k_proj": attention, "v_proj": attention, "o_proj": attention,
              "gate_proj": mlp, "up_proj": mlp, "down_proj": mlp}  # fmt: skip
    linears: dict[str, torch.nn.Linear] = {}
    for name in COLUMN_PARALLEL + ROW_PARALLEL:
        linear = getattr(owners[name], name, None)
        if linear is None and name == "v_proj" and hasattr(attention, "v_proj"):
            continue  # values are the keys (attention_k_eq_v): sharding k_proj shards them
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{where}: expected a Linear {name} in {type(owners[name]).__name__}; {supported}; "
                            "load with tp_plan='auto' for other models")  # fmt: skip
        linears[name] = linear
    head_dim = _head_dim(attention, config)
    counts = []
    for name in ("q_proj", "k_proj", "v_proj"):
        if name not in linears:
            continue
        outputs = linears[name].out_features
        if outputs % head_dim or (outputs // head_dim) % world:
            raise ValueError(f"{where}: {name} has {outputs} outputs, not a multiple of world size {world} x head_dim {head_dim}")
        counts.append(outputs // head_dim)
    if "v_proj" in linears and counts[2] != counts[1]:
        raise ValueError(f"{where}: v_proj has {counts[2]} heads of {head_dim}, k_proj {counts[1]}")
    for name in ("gate_proj", "up_proj"):
        if linears[name].out_features % world:
            raise ValueError(f"{where}: world size {world} does not divide {name}'s {linears[name].out_features} output features")
    for name in ROW_PARALLEL:
        if linears[name].in_features % world:
            raise ValueError(f"{where}: world size {world} does not divide {name}'s {linears[name].in_features} input features")
    _check_nothing_else_split(attention, mlp, linears, head_dim, counts[0], counts[1], where)
    return linears, (counts[0], counts[1])


def _check_nothing_else_split(attention: torch.nn.Module, mlp: torch.nn.Module, linears: dict[str, torch.nn.Linear], head_dim: int,
                              heads: int, kv_heads: int, where: str) -> None:  # fmt: skip
    """Refuse a layer whose attention or MLP holds state beside the split projections that depends on
    how they are split, which sharding would leave whole: a norm over all heads' features at once
    (OLMo 2's ``q_norm`` of ``heads * head_dim``), one per head (Cohere's ``(heads, head_dim)`` weight,
    StableLM's ``qk_layernorm`` list of norms), a value per head held by the attention itself (the
    attention sinks of GPT-OSS, Granite SWA, Flint: ``(heads,)``), or statistics over the whole
    intermediate size (Gemma 3n's activation sparsity). A norm over ``head_dim`` that every head
    shares (Qwen 3's, Gemma 3's: the weight of a child module) is the same on every rank.

    Raises:
        TypeError: naming the parameter, buffer or setting (the model is left as it was).
    """
    split = {id(tensor) for linear in linears.values() for tensor in (*linear.parameters(), *linear.buffers())}
    widths = {heads * head_dim, kv_heads * head_dim} - {head_dim}
    intermediate = linears["gate_proj"].out_features

    def refuse(what: str, owner: str) -> TypeError:
        return TypeError(f"{where}: {what} in {owner} depends on how its projections are split, and sharding by heads would "
                         "leave it whole; load with tp_plan='auto', or keep one process")  # fmt: skip

    for owner, module, sizes in (("the attention", attention, widths), ("the MLP", mlp, {intermediate})):
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if id(tensor) in split:
                continue
            shape = tuple(tensor.shape)
            by_head = module is attention and shape[:1] in ((heads,), (kv_heads,))
            per_head = by_head and (shape[1:2] == (head_dim,) or (len(shape) == 1 and "." not in name))  # (heads, head_dim), or a sink
            if per_head or sizes.intersection(shape):
                raise refuse(f"{name} of shape {shape}", owner)
    for name, child in attention.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) in (heads, kv_heads) and any(True for _ in child.parameters()):
            raise refuse(f"{name}, a list of {len(child)} modules (one per head)", "the attention")
    sparsity = getattr(mlp, "activation_sparsity", 0.0)
    if isinstance(sparsity, (int, float)) and sparsity > 0:
        raise refuse(f"activation_sparsity={sparsity}", "the MLP")  # a threshold from statistics over the whole intermediate size


def _split_rows(linear: torch.nn.Linear, rank: int, world: int) -> None:
    rows = linear.out_features // world  # world divides it: checked by _layer_shards
    keep = slice(rank * rows, (rank + 1) * rows)
    linear.weight = torch.nn.Parameter(linear.weight.data[keep].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[keep].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = rows


def _split_columns(linear: torch.nn.Linear, rank: int, world: int, group: Optional[Any]) -> None:
    columns = linear.in_features // world  # world divides it: checked by _layer_shards
    keep = slice(rank * columns, (rank + 1) * columns)
    linear.weight = torch.nn.Parameter(linear.weight.data[:, keep].clone(), requires_grad=linear.weight.requires_grad)
    linear.in_features = columns
    bias = linear.bias
    if bias is not None:
        linear.bias = None
        linear.register_buffer("reduced_bias", bias.data.clone(), persistent=False)
    linear.register_forward_hook(_all_reduce_output(group))


def _all_reduce_output(group: Optional[Any]):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.dtype in (torch.float16, torch.bfloat16):
            total = output.float()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
            output = total.to(output.dtype)
        else:
            dist.all_reduce(output, op=dist.ReduceOp.SUM, group=group)
        bias = getattr(module, "reduced_bias", None)
        return output + bias if bias is not None else output

    return hook


# ---------------------------------------------------------------------- paging on every rank


def rank_memory_config(memory_config: Optional[MemoryConfig], device: torch.device) -> MemoryConfig:
    """``memory_config`` (this rank's own budget) on this rank's ``device``."""
    config = memory_config if memory_config is not None else MemoryConfig(device=device)
    if not isinstance(config, MemoryConfig):
        raise TypeError(f"memory_config: expected a pagedtensor.MemoryConfig, got {type(config).__name__}")
    if config.device != device:
        if config.device.type != device.type:
            raise ValueError(f"memory_config.device: {config.device} but this rank's model is on {device}")
        config = dataclasses.replace(config, device=device)
    return config


def enable_tensor_parallel_paging(
    model: torch.nn.Module,
    memory_config: Optional[MemoryConfig] = None,
    *,
    group: Optional[Any] = None,
    **paging: Any,
) -> torch.nn.Module:
    """:func:`~pagedtensor.hf.model.enable_paging` on this rank's shard of a tensor-parallel model.

    ``model`` is sharded by :func:`shard_by_heads` or loaded with transformers' ``tp_plan="auto"``.
    ``memory_config`` is this rank's own budget (``vram_limit`` per GPU); its device becomes the
    rank's (``cuda:{local_rank}`` or ``cpu``, read from the model's parameters). The rank's
    :class:`~pagedtensor.hf.cache.PagedKVCache` pages only its ``num_key_value_heads / world`` heads.
    ``paging`` holds further :func:`enable_paging` options (``pager=`` instead of ``memory_config``:
    a pager built for this rank's device; ``page_weights=True`` pages the rank's shard). Returns ``model``.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generate") or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers causal LM (a PreTrainedModel with generate), got {type(model).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("enable_tensor_parallel_paging: torch.distributed is not initialized (call init_tensor_parallel first)")
    world = dist.get_world_size(group)
    check_tensor_parallel_heads(model.config, world)
    heads, kv_heads = _head_counts(model.config)
    local = _local_kv_heads(model)
    if world > 1 and local is not None and local != kv_heads // world:
        raise ValueError(
            f"enable_tensor_parallel_paging: this rank computes {local} KV heads, expected num_key_value_heads {kv_heads} / "
            f"world size {world} = {kv_heads // world}: shard the model first (shard_by_heads, or load with tp_plan='auto')"
        )
    if getattr(model, TENSOR_PARALLEL_ATTRIBUTE, None) is None:
        setattr(model, TENSOR_PARALLEL_ATTRIBUTE, TensorParallelShard(
            dist.get_rank(group), world, heads // world, kv_heads // world, "tp_plan"))
    _check_ranks_agree(group, attn_implementation=paging.get("attn_implementation", "auto"), prefill_chunk_size=paging.get("prefill_chunk_size"))
    if paging.get("pager") is None:  # a pager given brings its own device and budget (enable_paging checks the model's)
        memory_config = rank_memory_config(memory_config, _parameter_device(model))
    enable_paging(model, memory_config, **paging)
    return model


def _check_ranks_agree(group: Optional[Any], **options: Any) -> None:
    """Raise on every rank unless all ranks pass the same ``options``: the attention implementation
    and the prefill chunk decide how many all-reduces a forward makes, and ranks that disagree
    would meet mismatched collectives (a crash on gloo, a hang on NCCL). Budgets may differ."""
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, options, group=group)
    if any(other != gathered[0] for other in gathered):
        per_rank = "; ".join(f"rank {rank}: {', '.join(f'{k}={v!r}' for k, v in values.items())}" for rank, values in enumerate(gathered))
        raise ValueError(f"enable_tensor_parallel_paging: every rank must pass the same {', '.join(options)} ({per_rank})")


def _parameter_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return normalize_device(_local(parameter).device)
    return rank_info().device


def tensor_parallel_kwargs(plan: Any = "auto") -> dict[str, Any]:
    """The ``from_pretrained`` keywords that ask transformers for its tensor-parallel plan:
    ``distributed_config=DistributedConfig(tp_plan=...)`` where that exists (5.2x), else ``tp_plan=``."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": plan}
    if "tp_plan" in getattr(DistributedConfig, "__dataclass_fields__", {}):
        return {"distributed_config": DistributedConfig(tp_plan=plan)}
    return {"tp_plan": plan}


def load_tensor_parallel(
    name_or_path: str,
    memory_config: Optional[MemoryConfig] = None,
    *,
    dtype: Any = None,
    tp_plan: Any = "auto",
    backend: Optional[str] = None,
    load_tokenizer: bool = True,
    tokenizer: Any = None,
    paging: Optional[dict] = None,
    **hf_kwargs: Any,
) -> PagedModel:
    """Load ``name_or_path`` sharded by transformers' ``tp_plan`` (default ``"auto"``) on this rank
    and enable paging with this rank's budget ``memory_config``; returns a :class:`PagedModel`
    holding ``tokenizer`` where one is given, else the checkpoint's (``load_tokenizer``).
    ``PagedModel.from_pretrained(..., tp_plan="auto")`` comes here.

    Joins the process group first (:func:`init_tensor_parallel`) and checks that the world size
    divides the KV heads before any weight is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    info = init_tensor_parallel(backend)
    config_kwargs = {k: hf_kwargs[k] for k in ("revision", "trust_remote_code", "local_files_only", "cache_dir", "gguf_file") if k in hf_kwargs}
    check_tensor_parallel_heads(AutoConfig.from_pretrained(name_or_path, **config_kwargs), info.world_size)
    if dtype is not None:
        hf_kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **tensor_parallel_kwargs(tp_plan), **hf_kwargs)
    model.eval()
    enable_tensor_parallel_paging(model, memory_config, **(paging or {}))
    if load_tokenizer and tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **({"gguf_file": hf_kwargs["gguf_file"]} if "gguf_file" in hf_kwargs else {}))
        except (OSError, ValueError) as error:
            log.warning("load_tensor_parallel: no tokenizer for %s (%s)", name_or_path, error)
    return PagedModel(model, tokenizer=tokenizer)
