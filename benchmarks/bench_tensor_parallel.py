"""Tensor-parallel paged decode on 1, 2 and 4 GPUs: does decode scale linearly within 24 GiB per GPU?

Question: a Llama-2-7B-shaped model (32 layers, hidden 4096, 32 heads, MHA, fp16, random weights
with a fixed seed) on a 64K-token prompt, 32 new tokens, each GPU capped at 24 GiB with
``torch.cuda.set_per_process_memory_fraction``: with weights sharded by heads and each rank paging
its own KV heads under its own budget, is decode throughput on N GPUs at least 0.9 × N × the
one-GPU throughput, is each GPU's peak within its cap, and are the tokens the one-GPU tokens?

Weights: every rank builds the model on the meta device, keeps its shard
(:func:`pagedtensor.hf.distributed.shard_by_heads`: column-parallel q/k/v/gate/up, row-parallel
o/down with an all-reduce, the split of transformers' Llama ``tp_plan``), and fills it from the
same full random tensors (one generator seed per parameter), so N changes the split, not the model.
With ``--checkpoint DIR`` the ranks load DIR with transformers' ``tp_plan="auto"`` instead.
Each rank's pager: ``vram_limit`` = cap - local weights - activations - margin, pinned host memory
behind it (``--host-gib`` per rank), the ``"pagedllm"`` attention.

Driver (default) runs ``torchrun --nproc-per-node N`` for each N in ``--gpus`` (one subprocess each,
NCCL multicast off in its environment: ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``), collects rank 0's result, computes scaling against linear and writes
one JSON. A rank (``--child``, under torchrun) runs one untimed full-context warm-up generate, then
the measured one; rank 0 gathers every rank's peak memory and pager traffic.

Usage (on a multi-GPU H200 machine)::

    python -m benchmarks.bench_tensor_parallel                      # N = 1, 2, 4; JSON to benchmarks/results/tensor_parallel_h200.json
    torchrun --nproc-per-node 2 -m benchmarks.bench_tensor_parallel --child --out /tmp/tp2.json    # one N by hand
    python -m benchmarks.bench_tensor_parallel --device cpu --gpus 1,2 --layers 2 --hidden 128 --heads 4 \\
        --intermediate 256 --vocab 512 --context 256 --new-tokens 4 --page-size 64KiB --out /tmp/tp_cpu.json   # plumbing check, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import common_prefix, meta_llama, nonnegative_float, positive_float, positive_int, positive_int_list, repo_root  # noqa: E402

from pagedtensor.hf.distributed import COLUMN_PARALLEL, NCCL_SAFE_ENV, ROW_PARALLEL

GIB = 2**30
SCALING_TARGET = 0.9  # decode tok/s on N GPUs >= 0.9 x N x one GPU's


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=positive_int_list, default="1,2,4", help="world sizes the driver runs, comma-separated (default 1,2,4)")
    parser.add_argument("--context", type=positive_int, default=65536, help="prompt tokens (default 65536)")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated (default 32)")
    parser.add_argument("--cap-gib", type=positive_float, default=24.0, help="GPU memory cap per rank, GiB (default 24)")
    parser.add_argument("--layers", type=positive_int, default=32)
    parser.add_argument("--hidden", type=positive_int, default=4096)
    parser.add_argument("--heads", type=positive_int, default=32, help="attention heads = KV heads (default 32, MHA)")
    parser.add_argument("--intermediate", type=positive_int, default=11008)
    parser.add_argument("--vocab", type=positive_int, default=32000)
    parser.add_argument("--page-size", default="4MiB", help="pager page size (default 4MiB)")
    parser.add_argument("--chunk", type=positive_int, default=2048, help="prefill chunk, tokens (default 2048)")
    parser.add_argument("--margin-gib", type=nonnegative_float, default=1.0, help="headroom under the cap per rank (default 1.0)")
    parser.add_argument("--kv-vram-gib", type=positive_float, default=None, help="KV device budget per rank, GiB (default: cap - weights - activations - margin)")
    parser.add_argument("--host-gib", type=positive_float, default=32.0, help="pinned host budget per rank, GiB (default 32)")
    parser.add_argument("--stream-group", default="128MiB", help="bytes streamed per attention call (default 128MiB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="load this checkpoint with tp_plan='auto' instead of random weights")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default; nccl) or cpu (gloo, plumbing check on tiny shapes)")
    parser.add_argument("--timeout", type=positive_int, default=900, help="seconds per world size (default 900)")
    parser.add_argument("--out", default="benchmarks/results/tensor_parallel_h200.json", help="JSON results file")
    parser.add_argument("--child", action="store_true", help="run as one rank under torchrun; rank 0 writes --out")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- one rank


def build_sharded_model(args: argparse.Namespace, device, max_positions: int):
    """This rank's shard of the random-weight model: meta build, shard, allocate, fill from full tensors."""
    import torch
    import torch.distributed as dist
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from pagedtensor.hf.distributed import shard_by_heads

    model = meta_llama(args, max_positions)
    shard_by_heads(model)
    model.to_empty(device=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        for index, (name, parameter) in enumerate(model.named_parameters()):
            if "norm" in name:
                parameter.fill_(1.0)
                continue
            module_name = name.rsplit(".", 2)[-2]
            full_shape = list(parameter.shape)
            dim = 0 if module_name in COLUMN_PARALLEL else 1 if module_name in ROW_PARALLEL else None
            if dim is not None:
                full_shape[dim] *= world
            generator = torch.Generator(device=device).manual_seed(args.seed * 100003 + index)
            full = torch.empty(full_shape, dtype=parameter.dtype, device=device).normal_(0.0, 0.02, generator=generator)
            if dim is not None:
                size = parameter.shape[dim]
                full = full.narrow(dim, rank * size, size)
            parameter.copy_(full)
            del full
    model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config).to(device)  # its buffers were left empty
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def load_checkpoint(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM

    from pagedtensor.hf.distributed import tensor_parallel_kwargs

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float16, **tensor_parallel_kwargs()).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def activation_bytes(args: argparse.Namespace, world: int) -> int:
    """Prefill activations of one rank: the sequence-long hidden buffer (replicated), rotary tables,
    one chunk's local projections and MLP, and the fp32 buffer of the row-parallel all-reduce."""
    context = args.context + args.new_tokens
    hidden = context * args.hidden * 2
    rotary = 2 * context * (args.hidden // args.heads) * 2
    chunk = min(args.chunk, context)
    projections = chunk * (4 * args.hidden // world + args.hidden + 3 * args.intermediate // world) * 2
    reduce = chunk * args.hidden * 4 * 2
    logits = args.vocab * 4 * 2
    return hidden + rotary + projections + reduce + logits


def run_rank(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    from pagedtensor.config import MemoryConfig, parse_size
    from pagedtensor.hf import measure_generate, paging_state
    from pagedtensor.hf.distributed import check_tensor_parallel_heads, enable_tensor_parallel_paging, init_tensor_parallel

    cuda = args.device == "cuda"
    info = init_tensor_parallel("nccl" if cuda else "gloo")
    world = info.world_size
    result: dict[str, Any] = {"world_size": world, "status": "ok"}
    if cuda:
        total = torch.cuda.get_device_properties(info.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total), info.device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(10, args.vocab, (1, args.context), generator=generator).to(info.device)
    mask = torch.ones_like(prompt)
    mine: dict[str, Any] = {"rank": info.rank, "device": str(info.device)}
    try:
        if args.checkpoint is None:
            from types import SimpleNamespace

            check_tensor_parallel_heads(SimpleNamespace(num_attention_heads=args.heads, num_key_value_heads=args.heads), world)
            model = build_sharded_model(args, info.device, args.context + args.new_tokens)
        else:
            model = load_checkpoint(args)
        weights = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
        page_size = parse_size(args.page_size, "--page-size")
        kv_vram = (int(args.kv_vram_gib * GIB) if args.kv_vram_gib is not None
                   else int(args.cap_gib * GIB - weights - activation_bytes(args, world) - args.margin_gib * GIB))
        kv_vram -= kv_vram % page_size
        if kv_vram < page_size:
            raise ValueError(f"no room for KV pages under the cap: weights {weights / GIB:.2f} GiB per rank")
        config = MemoryConfig(vram_limit=kv_vram, host_memory=int(args.host_gib * GIB), page_size=page_size, slab_size=kv_vram,
                              prefetch_strategy="none", device=info.device)
        enable_tensor_parallel_paging(model, config, attn_implementation="pagedllm" if cuda else "auto",
                                      prefill_chunk_size=args.chunk, stream_group_bytes=args.stream_group)
        pager = paging_state(model).pager
        kv_total = 2 * args.layers * (args.hidden // world) * 2 * (args.context + args.new_tokens)
        mine.update(weights_gib=weights / GIB, kv_vram_gib=kv_vram / GIB, kv_total_gib=kv_total / GIB)
        cold = measure_generate(model, prompt, pager=pager, attention_mask=mask, do_sample=False, max_new_tokens=2)
        mine["cold_time_to_first_token_s"] = cold.time_to_first_token_s
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        measured = measure_generate(model, prompt, pager=pager, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens)
        mine.update(
            time_to_first_token_s=measured.time_to_first_token_s,
            decode_tokens_per_s=measured.tokens_per_second,
            total_s=measured.total_s,
            peak_gib=measured.peak_memory_gb,
            allocator_retries=measured.allocator_retries,
            peak_reserved_gib=torch.cuda.max_memory_reserved(info.device) / GIB if cuda else None,
            bytes_h2d_per_token=measured.paging["bytes_h2d_per_token"],
            prefill_bytes_d2h=measured.paging["prefill"]["bytes_d2h"],
            resident_device_gib=measured.paging["resident_bytes_at_first_token"]["device"] / GIB,
            tokens=measured.sequences[0, args.context:].tolist(),
        )
    except torch.cuda.OutOfMemoryError as error:
        mine.update(status="oom", error=str(error).splitlines()[0][:300], peak_gib=torch.cuda.max_memory_allocated(info.device) / GIB)
    except Exception as error:  # every rank must still reach the gather below, or rank 0 hangs
        mine.update(status="error", error=f"{type(error).__name__}: {error}"[:500])
    ranks: list = [None] * world
    dist.all_gather_object(ranks, mine)
    dist.destroy_process_group()
    if info.rank != 0:
        return None
    result["ranks"] = ranks
    failed = [r for r in ranks if r.get("status", "ok") != "ok"]
    if failed:
        result.update(status=failed[0]["status"], error=failed[0].get("error"))
        return result
    result.update(
        time_to_first_token_s=max(r["time_to_first_token_s"] for r in ranks),
        decode_tokens_per_s=min(r["decode_tokens_per_s"] or 0.0 for r in ranks),
        peak_gib_max=max(r["peak_gib"] or 0.0 for r in ranks) if cuda else None,
        tokens=ranks[0]["tokens"],
        tokens_equal_across_ranks=all(r["tokens"] == ranks[0]["tokens"] for r in ranks),
    )
    return result


def _local(tensor):
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


# ---------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_command(args: argparse.Namespace, world: int, out: str) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", "-m", "benchmarks.bench_tensor_parallel", "--child", "--out", out]
    for name in ("context", "new_tokens", "cap_gib", "layers", "hidden", "heads", "intermediate", "vocab", "page_size",
                 "chunk", "margin_gib", "host_gib", "stream_group", "seed", "device"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for name in ("checkpoint", "kv_vram_gib"):
        if getattr(args, name) is not None:
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return command


def run_world(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """One world size under torchrun in a subprocess; rank 0's result."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, f"world{world}.json")
        env = dict(os.environ, **NCCL_SAFE_ENV, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        start = time.perf_counter()
        try:
            completed = subprocess.run(child_command(args, world, out), env=env, capture_output=True, text=True,
                                       timeout=args.timeout, cwd=repo_root())
        except subprocess.TimeoutExpired:
            return {"world_size": world, "status": "timeout", "wall_s": args.timeout}
        if not os.path.exists(out):
            tail = (completed.stderr or completed.stdout).strip().splitlines()[-15:]
            return {"world_size": world, "status": "error", "returncode": completed.returncode, "error": "\n".join(tail)[-2000:]}
        with open(out) as handle:
            result = json.load(handle)
        result["wall_s"] = time.perf_counter() - start
        return result


def judge(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Scaling of decode tok/s against linear (N x one GPU), peak within the cap, tokens equal one GPU's."""
    base = next((r for r in results if r["world_size"] == 1 and r.get("status") == "ok"), None)
    verdicts: dict[str, Any] = {}
    for result in results:
        if result.get("status") != "ok":
            verdicts[str(result["world_size"])] = {"ok": False, "status": result.get("status")}
            continue
        world = result["world_size"]
        verdict: dict[str, Any] = {"ok": True, "tokens_equal_across_ranks": result["tokens_equal_across_ranks"]}
        if args.device == "cuda":
            verdict["peak_within_cap"] = all((r["peak_gib"] or 0) <= args.cap_gib for r in result["ranks"])
        if base is not None and base.get("decode_tokens_per_s"):
            scaling = result["decode_tokens_per_s"] / (world * base["decode_tokens_per_s"])
            verdict.update(scaling_vs_linear=scaling, scaling_target_met=scaling >= SCALING_TARGET,
                           speedup=result["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                           tokens_equal_one_gpu=result["tokens"] == base["tokens"],
                           tokens_matching_prefix=common_prefix(result["tokens"], base["tokens"]))
        verdicts[str(world)] = verdict
    return verdicts


def write_report(args: argparse.Namespace, results: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """Judge ``results`` so far and write the JSON; the driver calls it after every world size, so a
    run cut short still leaves the world sizes it finished. Returns the verdicts."""
    import transformers

    from benchmarks.common import write_results

    verdicts = judge(results, args)
    write_results(args.out, {
        "benchmark": "tensor_parallel",
        "transformers": transformers.__version__,
        "model": {"shape": "Llama-2-7B" if (args.layers, args.hidden, args.heads) == (32, 4096, 32) else "custom",
                  "layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.heads,
                  "intermediate": args.intermediate, "vocab": args.vocab, "dtype": "float16",
                  "weights": args.checkpoint or f"random, seed {args.seed}, sharded by heads"},
        "settings": {"gpus": ",".join(map(str, args.gpus)),  # as given on the command line ("1,2,4")
                     **{k: getattr(args, k) for k in ("context", "new_tokens", "cap_gib", "page_size", "chunk",
                                                      "margin_gib", "kv_vram_gib", "host_gib", "stream_group", "device")}},
        "targets": {"scaling_vs_linear": SCALING_TARGET, "peak_gib_per_gpu": args.cap_gib},
        "notes": [
            "each world size runs under torchrun in its own subprocess, NCCL multicast off (NCCL_NVLS_ENABLE=0, "
            "TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1)",
            "every rank: one untimed full-context warm-up generate, then the measured one",
            "decode_tokens_per_s is the slowest rank's; time_to_first_token_s the slowest rank's",
            "peak_gib is torch.cuda.max_memory_allocated per rank; the cap is set with set_per_process_memory_fraction",
            "scaling_vs_linear = decode tok/s on N GPUs / (N x decode tok/s on 1 GPU)",
        ],
        "runs": results,
        "verdicts": verdicts,
        "wall_s": time.perf_counter() - started,
    })
    return verdicts


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_rank(args)
        if result is not None:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as handle:
                json.dump(result, handle, indent=2)
        return 0
    import torch

    from benchmarks.common import print_table

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_tensor_parallel needs CUDA devices (--device cpu only checks the plumbing)", file=sys.stderr)
        return 2
    worlds = args.gpus
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for world in worlds:
        if args.device == "cuda" and world > torch.cuda.device_count():
            results.append({"world_size": world, "status": "skipped", "error": f"{torch.cuda.device_count()} GPUs here"})
            continue
        if args.heads % world:
            results.append({"world_size": world, "status": "skipped", "error": f"{world} does not divide {args.heads} KV heads"})
            continue
        result = run_world(args, world)
        results.append(result)
        write_report(args, results, started)
        print(f"[{time.perf_counter() - started:6.1f} s] N={world}: " + json.dumps(
            {k: result.get(k) for k in ("status", "time_to_first_token_s", "decode_tokens_per_s", "peak_gib_max", "error")}), flush=True)
    verdicts = write_report(args, results, started)
    rows = [{
        "gpus": r["world_size"], "status": r.get("status"), "ttft_s": r.get("time_to_first_token_s"),
        "decode_tok_s": r.get("decode_tokens_per_s"), "peak_GiB_max": r.get("peak_gib_max"),
        "scaling": verdicts.get(str(r["world_size"]), {}).get("scaling_vs_linear"),
        "tokens_eq_1": verdicts.get(str(r["world_size"]), {}).get("tokens_equal_one_gpu"),
    } for r in results]
    print_table(rows, ["gpus", "status", "ttft_s", "decode_tok_s", "peak_GiB_max", "scaling", "tokens_eq_1"])
    print(f"wrote {args.out}")
    # Exit 1 where a world size ran and failed (an error, out of memory, a timeout) or its ranks
    # generated different tokens, as the other benchmarks do; one skipped for want of GPUs is no failure.
    failed = [r for r in results if r.get("status") not in ("ok", "skipped")]
    split = [world for world, verdict in verdicts.items() if verdict.get("tokens_equal_across_ranks") is False]
    return 1 if failed or split else 0


if __name__ == "__main__":
    raise SystemExit(main())
