"""One rank of the 2-process tensor-parallel test (launched by ``tests/hf/test_tensor_parallel.py``).

Reads the torchrun-style environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), joins a gloo group, shards the tiny Llama 2 ways (``--sharding shard_by_heads``:
built here from the fixed seed, or the tiny model of ``--family``; ``--sharding tp_plan``: loaded from ``--checkpoint`` with
transformers' ``tp_plan="auto"``), pages its KV heads under a budget of a few pages, and greedily
generates for batch 1 and a left-padded batch of 3, once with SDPA on pages read back and once
with the ``"pagedllm"`` attention. Writes ``--out/rank{RANK}.json``: tokens, logits, pager stats.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":  # the test hides GPUs: kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pagedtensor import MemoryConfig  # noqa: E402
from pagedtensor.hf import PagedModel, paging_state  # noqa: E402
from pagedtensor.hf.distributed import enable_tensor_parallel_paging, init_tensor_parallel, shard_by_heads, tensor_parallel_kwargs  # noqa: E402
from tests.hf.tiny_models import output_cache, prompts, tiny_pair  # noqa: E402

PAGE = 4096  # 32 tokens of K+V per page for one local KV head (1 x 16 x fp32 x 2)
NEW_TOKENS = 8
ATTENTIONS = ("sdpa", "pagedllm")


def rank_budget(nvme_path: str) -> MemoryConfig:
    """Two device pages and one host page per rank: a 48-token sequence needs 2 pages per layer."""
    return MemoryConfig(vram_limit=2 * PAGE, host_memory=PAGE, page_size=PAGE, nvme_path=nvme_path, device="cpu", slab_size=PAGE)


GIVEN_TOKENIZER = object()  # a tokenizer given to from_pretrained is the one the PagedModel holds


def paged_models(args: argparse.Namespace, rank: int) -> list[tuple[str, torch.nn.Module]]:
    """``(attention, model)`` pairs, paging enabled with this rank's budget. With ``tp_plan``, the
    SDPA model is loaded and then paged, the "pagedllm" one through ``PagedModel.from_pretrained(tp_plan="auto")``."""
    def budget(attention: str) -> MemoryConfig:
        nvme = os.path.join(args.nvme, f"rank{rank}-{attention}")
        os.makedirs(nvme, exist_ok=True)
        return rank_budget(nvme)

    options = {"prefill_chunk_size": 16}
    if args.sharding == "shard_by_heads":
        models = tiny_pair(args.family, attn="sdpa")  # identical weights in every process (fixed seed)
        return [(attention, enable_tensor_parallel_paging(shard_by_heads(model), budget(attention), attn_implementation=attention, **options))
                for model, attention in zip(models, ATTENTIONS)]
    from transformers import LlamaForCausalLM

    sdpa = LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, **tensor_parallel_kwargs()).eval()
    enable_tensor_parallel_paging(sdpa, budget("sdpa"), attn_implementation="sdpa", **options)
    paged = PagedModel.from_pretrained(args.checkpoint, budget("pagedllm"), tp_plan="auto", dtype=torch.float32, tokenizer=GIVEN_TOKENIZER,
                                       paging={"attn_implementation": "pagedllm", **options})
    args.tokenizer_kept = paged.tokenizer is GIVEN_TOKENIZER
    return [("sdpa", sdpa), ("pagedllm", paged.model)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sharding", choices=("shard_by_heads", "tp_plan"), required=True)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--family", default="llama", help="the tiny model shard_by_heads shards (tests/hf/tiny_models.py)")
    parser.add_argument("--nvme", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    info = init_tensor_parallel("gloo")
    torch.set_num_threads(1)
    result: dict = {"rank": info.rank, "world_size": info.world_size, "runs": {}}
    unsharded, _ = tiny_pair("llama")
    try:
        enable_tensor_parallel_paging(unsharded, rank_budget(args.nvme))
    except ValueError as error:  # every head on every rank: not a tensor-parallel shard
        result["unsharded_error"] = str(error)
    _, mismatched = tiny_pair("llama", attn="sdpa")
    try:  # ranks that chunk prefill differently would meet mismatched all-reduces
        enable_tensor_parallel_paging(shard_by_heads(mismatched), rank_budget(os.path.join(args.nvme, f"rank{info.rank}-mismatch")),
                                      attn_implementation="pagedllm", prefill_chunk_size=16 * (1 + info.rank))
    except ValueError as error:
        result["mismatch_error"] = str(error)
    for attention, model in paged_models(args, info.rank):
        pager = paging_state(model).pager
        for batch in (1, 3):
            ids, mask = prompts(batch)
            before = pager.stats()
            output = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
            after = pager.stats()
            result["runs"][f"{attention}-{batch}"] = {
                "sequences": output.sequences.tolist(),
                "logits": [step.tolist() for step in output.logits],
                "kv_heads": [layer.geometry.kv_heads for layer in output_cache(output).layers],
                "head_dims": [layer.geometry.head_dim for layer in output_cache(output).layers],
                "stats": {key: after[key] - before[key] for key in ("bytes_d2h", "bytes_h2d", "bytes_to_disk", "bytes_from_disk")},
            }
    result["tokenizer_kept"] = getattr(args, "tokenizer_kept", None)
    with open(os.path.join(args.out, f"rank{info.rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
