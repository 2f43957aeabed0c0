"""Loading a checkpoint whose layer weights exceed the device budget, with its weights paged.

Question: does ``PagedModel.from_pretrained(path, config, paging={"page_weights": True})`` page each
decoder-layer weight from the checkpoint, so that the device never holds the layers' weights whole
and host memory grows by the pager's budgets rather than by the model? Against the plain load
(``AutoModelForCausalLM.from_pretrained(path).to(device)``) in the same run, each in its own process:

* ``device_peak_bytes``: ``torch.cuda.max_memory_allocated()`` over the load, above what was allocated
  before it (CUDA only; on the CPU the device tier is host memory and this is not measured).
* ``host_anon_growth_bytes``: growth of the process's anonymous resident memory (``RssAnon``) over the
  load, with torch, transformers and the model's classes imported before the baseline. transformers
  maps the checkpoint's safetensors files: weights read from there are file pages, not anonymous
  memory, until something copies them.
* ``load_s``, and the tokens of a short greedy generate under SDPA, compared between the two.

``pass``: the paged load's device peak (CUDA) stays under the layers' weights, and its tokens are the
plain load's. The checkpoint is a random-weight Llama saved once under ``--checkpoint`` (default: a
temporary folder).

Usage: python benchmarks/bench_paged_load.py [--device cuda] [--layers 8 --hidden 1024 ...]
       [--vram-limit 48MiB --host-memory 32MiB --page-size 1MiB] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    add_device_argument,
    cuda_missing,
    name_list,
    positive_int,
    print_result_line,
    print_table,
    run_configuration_process,
    write_results,
)

RUNS = ("plain", "paged")
NEW_TOKENS = 8


def anonymous_resident_bytes() -> int:
    """This process's anonymous resident memory (``RssAnon`` of ``/proc/self/status``), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line: this measurement needs Linux")


def save_checkpoint(args: argparse.Namespace, path: str) -> None:
    """A random-weight Llama of the arguments' shape, saved as safetensors under ``path`` (once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return
    config = LlamaConfig(
        num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
        eos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(path)


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 - imported before the baseline

    from pagedtensor import MemoryConfig
    from pagedtensor.hf import PagedModel, paging_state

    cuda = args.device == "cuda"
    result: dict[str, Any] = {"run": args.child, "status": "ok"}
    with tempfile.TemporaryDirectory(prefix="pagedllm-load-") as scratch:
        config = MemoryConfig(vram_limit=args.vram_limit, host_memory=args.host_memory, page_size=args.page_size,
                              nvme_path=scratch, device=args.device, prefetch_strategy="none")  # fmt: skip
        if cuda:
            torch.cuda.init()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        device_before = torch.cuda.memory_allocated() if cuda else 0
        host_before = anonymous_resident_bytes()
        start = time.perf_counter()
        if args.child == "plain":
            model = AutoModelForCausalLM.from_pretrained(args.checkpoint).to(args.device).eval()
        else:
            model = PagedModel.from_pretrained(args.checkpoint, config, load_tokenizer=False,
                                               paging={"page_weights": True, "attn_implementation": "sdpa"})  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        result["load_s"] = time.perf_counter() - start
        result["host_anon_growth_bytes"] = anonymous_resident_bytes() - host_before
        if cuda:
            result["device_peak_bytes"] = torch.cuda.max_memory_allocated() - device_before
        layers = model.model.layers if args.child == "plain" else model.model.model.layers
        result["layer_weight_bytes"] = sum(p.numel() * p.element_size() for p in layers.parameters())
        result["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        if args.child == "paged":
            stats = paging_state(model.model).pager.stats()
            result["resident_bytes"] = stats["resident_bytes"]
        generator = torch.Generator().manual_seed(args.seed + 1)
        prompt = torch.randint(3, args.vocab, (1, 32), generator=generator).to(args.device)
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False)
        result["tokens"] = tokens[0, prompt.shape[1] :].tolist()
        if args.child == "paged":
            paging_state(model.model).pager.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--hidden", type=positive_int, default=1024)
    parser.add_argument("--intermediate", type=positive_int, default=4096)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--kv-heads", type=positive_int, default=8)
    parser.add_argument("--vocab", type=positive_int, default=1000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vram-limit", default="48MiB")
    parser.add_argument("--host-memory", default="32MiB")
    parser.add_argument("--page-size", default="1MiB")
    parser.add_argument("--checkpoint", default="", help="folder of the random checkpoint (made there once; default: a temporary folder)")
    parser.add_argument("--runs", type=name_list(RUNS, at_least_one=True), default=",".join(RUNS), help=f"configurations to run (default {','.join(RUNS)})")
    parser.add_argument("--timeout", type=positive_int, default=900, help="seconds per configuration subprocess (default 900)")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "paged_load.json"))
    args = parser.parse_args(argv)
    if args.child:
        print_result_line(run_child(args))
        return 0
    kinds = args.runs
    if cuda_missing("bench_paged_load.py", args.device):
        return 1
    with tempfile.TemporaryDirectory(prefix="pagedllm-checkpoint-") as default_folder:
        checkpoint = args.checkpoint or default_folder
        save_checkpoint(args, checkpoint)
        shape = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "dtype", "seed", "vram_limit", "host_memory", "page_size")
        child = [sys.executable, os.path.abspath(__file__), "--device", args.device,
                 *[item for name in shape for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]]  # fmt: skip
        rows = []
        for run in kinds:
            command = [*child, "--child", run, "--checkpoint", checkpoint]
            rows.append(run_configuration_process(command, args.timeout, {"run": run}))
    by_run = {row["run"]: row for row in rows}
    plain, paged = by_run.get("plain"), by_run.get("paged")
    ok = all(row.get("status") == "ok" for row in rows)
    tokens_equal = bool(ok and plain and paged and plain["tokens"] == paged["tokens"])
    device_ok = None
    if ok and paged and args.device == "cuda":
        device_ok = paged["device_peak_bytes"] < paged["layer_weight_bytes"]
    results = {
        "benchmark": "paged_load",
        "device_tier": args.device,
        "shape": {name: getattr(args, name) for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "dtype")},
        "budgets": {"vram_limit": args.vram_limit, "host_memory": args.host_memory, "page_size": args.page_size},
        "rows": rows,
        "tokens_equal": tokens_equal,
        "device_peak_under_layer_weights": device_ok,
        "pass": tokens_equal and device_ok is not False,
    }
    print_table(rows, ["run", "status", "load_s", "weight_bytes", "layer_weight_bytes", "host_anon_growth_bytes", "device_peak_bytes"])
    write_results(args.out, results)
    print(f"pass: {results['pass']}  (results in {args.out})")
    # Exit 1 where a run failed (status other than "ok"), or where both runs ran and the results do
    # not pass (tokens differ, or the device peak reached the layers' weights), as the other
    # benchmarks do: gpu_suite.sh's `|| status=1` relies on it.
    return 0 if ok and (results["pass"] or not (plain and paged)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
