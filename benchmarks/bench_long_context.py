"""Long-context generation under a GPU memory cap: paged KV cache against Hugging Face's caches.

Question: does a Llama-2-7B-shaped model (32 layers, hidden 4096, 32 heads, MHA, fp16, random
weights with a fixed seed, SDPA for the HF runs) answer over a 64K-token prompt within 24 GiB, and
how fast, against HF native (no cap, and under the cap: OOM expected) and HF's offloaded cache
(``cache_implementation="offloaded"``, i.e. ``DynamicCache(offloading=True)``) under the cap?

One run of this script measures, for every context length (default 8192, 32768, 65536), each
configuration in its own subprocess, so an out-of-memory error or the per-process memory cap
(``torch.cuda.set_per_process_memory_fraction``) cannot poison another:

* ``paged``      PagedLLM: ``enable_paging`` with the KV device budget = cap - weights - activations,
                 pinned host memory behind it, ``"pagedllm"`` attention; capped.
* ``native``     HF generate with its default cache, no cap (the TTFT reference).
* ``native_cap`` the same, capped (expected: OOM at long context).
* ``offloaded``  HF offloaded cache, capped. It decodes at ~0.2 tokens/s, so it generates
                 ``--offload-new-tokens`` tokens (default 4) to keep the whole script under 9 minutes.

Every configuration first generates once without being timed (a warm-up: CUDA kernels, cuBLAS,
and for ``paged`` the pinned host slabs, grown at the full context as a serving process would at
start-up; the cold TTFT of that first paged run is reported too). Reported per run: time to first
token, decode tokens/s after the first token, peak GPU memory allocated (GiB), the bytes the pager
moved host→device per decoded token and the PCIe bound they imply (54 GB/s ÷ bytes per token), and
whether the greedy tokens equal the native run's. Targets (64K): peak ≤ cap, decode ≥ 2.0 tokens/s,
TTFT ≤ 1.15 × native TTFT.

Usage (on the H100)::

    python -m benchmarks.bench_long_context                       # 8K, 32K, 64K; JSON to benchmarks/results/long_context_h100.json
    python -m benchmarks.bench_long_context --contexts 65536 --runs paged,native
    python -m benchmarks.bench_long_context --layers 2 --contexts 4096 --out /tmp/smoke.json   # a quick smoke run
    python -m benchmarks.bench_long_context --device cpu --runs paged,native --contexts 512 --layers 2 --hidden 128 \
        --heads 4 --intermediate 256 --vocab 512 --page-size 64KiB --chunk 128 --kv-vram-gib 0.001 --out /tmp/lc_cpu.json   # plumbing, CPU
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    LayerTimeline,
    add_llama_shape_arguments,
    common_prefix,
    kernel_profile,
    meta_llama,
    name_list,
    nonnegative_float,
    pinned_h2d_gb_per_s,
    positive_float,
    positive_int,
    positive_int_list,
    print_result_line,
    run_configuration_process,
)

PCIE_H2D_BYTES_PER_S = 54e9  # pinned host→device, one large copy, H100 PCIe Gen5 (DESIGN.md)
TARGETS = {"decode_tokens_per_s": 2.0, "ttft_vs_native": 1.15}
RUN_KINDS = ("paged", "native", "native_cap", "offloaded")
GIB = 2**30


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=positive_int_list, default="65536,32768,8192",
                        help="prompt lengths, comma-separated (64K first: the headline)")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated per run (default 32)")
    parser.add_argument("--offload-new-tokens", type=positive_int, default=4, help="tokens for the slow HF offloaded run (default 4)")
    parser.add_argument("--cap-gib", type=positive_float, default=24.0, help="GPU memory cap of the capped runs, GiB (default 24)")
    parser.add_argument("--runs", type=name_list(RUN_KINDS, at_least_one=True), default=",".join(RUN_KINDS), help=f"configurations to run (default {','.join(RUN_KINDS)})")
    parser.add_argument("--out", default="benchmarks/results/long_context_h100.json", help="JSON results file")
    add_llama_shape_arguments(parser)
    parser.add_argument("--page-size", default="4MiB", help="pager page size (default 4MiB: 256 tokens of K+V at this shape)")
    parser.add_argument("--chunk", type=positive_int, default=8192,
                        help="prefill chunk, tokens (default 8192: on an H200 at 64K, TTFT 1.09x native against 1.14x with 2048, decode unchanged)")
    parser.add_argument("--kv-vram-gib", type=positive_float, default=None, help="KV device budget, GiB (default: cap - weights - activations)")
    parser.add_argument("--margin-gib", type=nonnegative_float, default=0.4,
                        help="headroom kept under the cap for the allocator and workspaces (default 0.4; a paged run that "
                             "runs out of memory is retried once with --retry-margin-gib more)")
    parser.add_argument("--retry-margin-gib", type=nonnegative_float, default=0.75, help="extra headroom of the retry (default 0.75)")
    parser.add_argument("--host-gib", type=positive_float, default=48.0, help="pinned host budget of the pager, GiB (default 48)")
    parser.add_argument("--stream-group", default="128MiB", help="bytes streamed per attention call (default 128MiB)")
    parser.add_argument("--timeout", type=positive_int, default=240, help="seconds per configuration subprocess (default 240)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default); cpu only checks the plumbing on tiny shapes")
    parser.add_argument("--no-timeline", dest="timeline", action="store_false",
                        help="skip the extra prefill of the paged and native runs that times each layer (prefill_timeline)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one more prefill of the paged and native runs with torch.profiler (kernel_profile)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=positive_int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- child: one configuration


def build_model(args: argparse.Namespace, max_positions: int):
    """Random-weight model of :func:`~benchmarks.common.meta_llama` (Llama-2-7B's shape by default) in
    fp16 on the GPU, built without a CPU copy."""
    import torch

    model = meta_llama(args, max_positions)
    config = model.config
    device = torch.device(args.device)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)  # its buffers were left empty
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def activation_bytes(args: argparse.Namespace, context: int) -> int:
    """Prefill activations under paging: one sequence-long hidden buffer (layers write it in place),
    the rotary tables, and one chunk's projections and MLP."""
    hidden = context * args.hidden * 2
    rotary = 2 * context * (args.hidden // args.heads) * 2
    chunk = min(args.chunk, context) * (4 * args.hidden + 3 * args.intermediate) * 2
    return hidden + rotary + chunk


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pagedtensor.config import MemoryConfig, parse_size

    kind, context = args.child, args.context
    result: dict[str, Any] = {"run": kind, "context": context, "status": "ok", "margin_gib": args.margin_gib}
    capped = kind in ("paged", "native_cap", "offloaded")
    cuda = args.device == "cuda"
    if capped and cuda:
        fraction = min(1.0, args.cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.set_per_process_memory_fraction(fraction)
        result["memory_fraction"] = fraction
    new_tokens = args.offload_new_tokens if kind == "offloaded" else args.new_tokens
    result["new_tokens_requested"] = new_tokens
    if kind == "paged" and cuda:
        result["h2d_copy_gb_per_s"] = pinned_h2d_gb_per_s()  # this machine's baseline, before the model takes memory
    generator = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(10, args.vocab, (1, context), generator=generator).to(args.device)
    mask = torch.ones_like(prompt)
    phase = "load"  # where an out-of-memory error happened: load, warm-up, measured, timeline or profile
    cold = None
    try:
        model = build_model(args, context + new_tokens)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        result["weights_gib"] = weights / GIB
        from pagedtensor.hf import enable_paging, measure_generate, paging_state

        generate_kwargs: dict[str, Any] = dict(do_sample=False, attention_mask=mask)
        pager = None
        if kind == "paged":
            kv_vram = (
                int(args.kv_vram_gib * GIB)
                if args.kv_vram_gib is not None
                else int(args.cap_gib * GIB - weights - activation_bytes(args, context) - args.margin_gib * GIB)
            )
            page_size = parse_size(args.page_size, "--page-size")
            kv_vram -= kv_vram % page_size
            config = MemoryConfig(
                vram_limit=kv_vram,
                host_memory=int(args.host_gib * GIB),
                page_size=page_size,
                slab_size=kv_vram,  # one device slab: the kernels read every resident page in one call
                prefetch_strategy="none",
                device=args.device,
            )
            attention = "pagedllm" if cuda else "auto"
            enable_paging(model, config, attn_implementation=attention, prefill_chunk_size=args.chunk, stream_group_bytes=args.stream_group)
            pager = paging_state(model).pager
            kv_total = 2 * args.layers * args.hidden * 2 * (context + new_tokens)
            result.update(kv_vram_gib=kv_vram / GIB, kv_total_gib=kv_total / GIB, page_size=page_size)
            # Warm-up at the full context: grows the pinned host slabs once, as a server does at start.
            phase = "warm-up"
            cold = measure_generate(model, prompt, pager=pager, max_new_tokens=2, **generate_kwargs)
            result["cold_time_to_first_token_s"] = cold.time_to_first_token_s
        else:
            if kind == "offloaded":
                generate_kwargs["cache_implementation"] = "offloaded"
            phase = "warm-up"
            # At the full context, as the paged run's: warmed on 256 tokens only (before 2026-12-06),
            # native's measured prefill was its first at that length, 1.4-2.8% slower than its warm
            # one, which flattered the paged run's time-to-first-token ratio by as much.
            model.generate(prompt, do_sample=False, max_new_tokens=2, attention_mask=mask,
                           **({"cache_implementation": "offloaded"} if kind == "offloaded" else {}))
        phase = "measured"
        measured = measure_generate(model, prompt, pager=pager, max_new_tokens=new_tokens, output_logits=True,
                                    return_dict_in_generate=True, **generate_kwargs)  # fmt: skip
        result.update(top2_of_each_step(measured.output))
        result.update(
            time_to_first_token_s=measured.time_to_first_token_s,
            decode_tokens_per_s=measured.tokens_per_second,
            total_s=measured.total_s,
            peak_gib=measured.peak_memory_gb,
            allocator_retries=measured.allocator_retries,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB if cuda else None,
            new_tokens=measured.new_tokens,
            tokens=measured.sequences[0, context:].tolist(),
        )
        if pager is not None:
            per_token = measured.paging["bytes_h2d_per_token"]
            resident = measured.paging["resident_bytes_at_first_token"]["device"]
            exact_bound_bytes = max(0, result["kv_total_gib"] * GIB - result["kv_vram_gib"] * GIB)
            result.update(
                bytes_h2d_per_token=per_token,
                gb_h2d_per_token=per_token / 1e9,
                pcie_bound_tokens_per_s=PCIE_H2D_BYTES_PER_S / per_token if per_token else None,
                exact_bound_tokens_per_s=PCIE_H2D_BYTES_PER_S / exact_bound_bytes if exact_bound_bytes else None,
                achieved_h2d_gb_per_s=per_token * measured.tokens_per_second / 1e9 if measured.tokens_per_second else None,
                measured_bound_tokens_per_s=result["h2d_copy_gb_per_s"] * 1e9 / per_token if per_token and result.get("h2d_copy_gb_per_s") else None,
                prefill_bytes_d2h=measured.paging["prefill"]["bytes_d2h"],
                decode_bytes_d2h=measured.paging["decode"]["bytes_d2h"],
                resident_device_gib=resident / GIB,
            )
        # Let the measured output (its logits, its KV cache) go before another prefill needs the memory: kept,
        # it made the timeline prefill run out of memory under the cap at 875c96c (results/long_context_875c96c_h200.json).
        measured = cold = None
        gc.collect()
        if args.timeline and kind in ("paged", "native"):
            # One more prefill (max_new_tokens=1), layer by layer: where the paged TTFT differs from native.
            phase = "timeline"
            timeline = LayerTimeline(model, list(model.model.layers))
            try:
                timeline.start()
                measure_generate(model, prompt, pager=pager, max_new_tokens=1, **generate_kwargs)
                result["prefill_timeline"] = timeline.summary()
            finally:
                timeline.remove()
        if args.profile and kind in ("paged", "native"):
            phase = "profile"
            result["prefill_kernel_profile"] = kernel_profile(
                lambda: measure_generate(model, prompt, pager=pager, max_new_tokens=1, **generate_kwargs))
    except torch.cuda.OutOfMemoryError as error:
        # peak_gib stays the measured run's when that run finished; peak_at_error_gib is since the phase began.
        result.update(status="oom", oom_phase=phase, error=str(error).splitlines()[0][:300],
                      peak_at_error_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None)
    return result


# ---------------------------------------------------------------------- parent: all configurations


def top2_of_each_step(output: Any) -> dict[str, list]:
    """The two highest-scoring tokens of each generated step and the gap between their logits: where
    two runs' greedy tokens part, whether the first of them had a near tie there."""
    import torch

    logits = getattr(output, "logits", None)
    if not logits:
        return {}
    top = torch.stack([step[0].float() for step in logits]).topk(2, dim=-1)
    return {"top2_tokens": top.indices.tolist(), "top2_logit_gap": [round(v, 5) for v in (top.values[:, 0] - top.values[:, 1]).tolist()]}


def run_configuration(args: argparse.Namespace, kind: str, context: int) -> dict[str, Any]:
    """One configuration in a subprocess; a paged run that runs out of memory is retried once with
    more headroom (the KV budget is derived from the cap with an estimate of the activations)."""
    result = _run_subprocess(args, kind, context, args.margin_gib)
    if kind == "paged" and result.get("status") == "oom" and args.kv_vram_gib is None and args.retry_margin_gib > 0:
        retry = _run_subprocess(args, kind, context, args.margin_gib + args.retry_margin_gib)
        retry["first_attempt"] = {k: result.get(k) for k in ("status", "oom_phase", "error", "margin_gib", "kv_vram_gib", "peak_gib", "peak_at_error_gib")}
        return retry
    return result


def _run_subprocess(args: argparse.Namespace, kind: str, context: int, margin_gib: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench_long_context", "--child", kind, "--context", str(context),
               "--margin-gib", str(margin_gib)]
    for name in ("new_tokens", "offload_new_tokens", "cap_gib", "layers", "hidden", "heads", "intermediate", "vocab",
                 "page_size", "chunk", "host_gib", "stream_group", "seed", "device"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.kv_vram_gib is not None:
        command += ["--kv-vram-gib", str(args.kv_vram_gib)]
    if not args.timeline:
        command.append("--no-timeline")
    if args.profile:
        command.append("--profile")
    return run_configuration_process(command, args.timeout, {"run": kind, "context": context, "margin_gib": margin_gib})


def judge(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Pass/fail of the paged runs against the targets (and native cross-checks), per context."""
    verdicts: dict[str, Any] = {}
    by_key = {(r["run"], r["context"]): r for r in results}
    for context in sorted({r["context"] for r in results}):
        paged = by_key.get(("paged", context))
        native = by_key.get(("native", context))
        if paged is None or paged.get("status") != "ok":
            verdicts[str(context)] = {"paged_ok": False}
            continue
        verdict: dict[str, Any] = {"paged_ok": True, "peak_within_cap": paged["peak_gib"] is not None and paged["peak_gib"] <= args.cap_gib}
        verdict["decode_tokens_per_s"] = paged["decode_tokens_per_s"]
        verdict["decode_target_met"] = (paged["decode_tokens_per_s"] or 0) >= TARGETS["decode_tokens_per_s"]
        if native is not None and native.get("status") == "ok":
            ratio = paged["time_to_first_token_s"] / native["time_to_first_token_s"]
            verdict["ttft_vs_native"] = ratio
            verdict["ttft_target_met"] = ratio <= TARGETS["ttft_vs_native"]
            verdict["tokens_equal_native"] = paged["tokens"] == native["tokens"]
            verdict["tokens_matching_prefix"] = step = common_prefix(paged["tokens"], native["tokens"])
            if step < min(len(paged["tokens"]), len(native["tokens"])) and "top2_tokens" in paged and "top2_tokens" in native:
                verdict["first_divergence"] = {"step": step, "native_top2": native["top2_tokens"][step], "paged_top2": paged["top2_tokens"][step],
                                               "native_logit_gap": native["top2_logit_gap"][step], "paged_logit_gap": paged["top2_logit_gap"][step]}  # fmt: skip
        for kind in ("native_cap", "offloaded"):
            other = by_key.get((kind, context))
            if other is not None:
                verdict[f"{kind}_status"] = other.get("status")
                if other.get("status") == "ok" and other.get("decode_tokens_per_s") and paged["decode_tokens_per_s"]:
                    verdict[f"decode_speedup_vs_{kind}"] = paged["decode_tokens_per_s"] / other["decode_tokens_per_s"]
        verdicts[str(context)] = verdict
    return verdicts


def _write(args: argparse.Namespace, results: list, verdicts: dict, wall_s: float, write_results, transformers_version: str) -> None:
    """Write the results so far (with their verdicts) to ``args.out``."""
    write_results(args.out, {
        "benchmark": "long_context",
        "transformers": transformers_version,
        "model": {"shape": "Llama-2-7B" if (args.layers, args.hidden, args.heads) == (32, 4096, 32) else "custom",
                  "layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.heads,
                  "intermediate": args.intermediate, "vocab": args.vocab, "dtype": "float16", "weights": f"random, seed {args.seed}"},
        "settings": {k: getattr(args, k) for k in ("new_tokens", "offload_new_tokens", "cap_gib", "page_size", "chunk",
                                                   "kv_vram_gib", "margin_gib", "retry_margin_gib", "host_gib", "stream_group")},
        "targets": {**TARGETS, "peak_gib": args.cap_gib, "pcie_h2d_bytes_per_s": PCIE_H2D_BYTES_PER_S},
        "notes": [
            "each configuration runs in its own subprocess after one untimed warm-up generate",
            "paged warm-up runs at the full context so the pinned host slabs exist before timing; cold_time_to_first_token_s is that first run",
            f"the HF offloaded cache decodes ~0.2 tokens/s, so it generates {args.offload_new_tokens} tokens",
            "peak_gib is torch.cuda.max_memory_allocated in GiB; the cap is set with torch.cuda.set_per_process_memory_fraction",
            "bound_tok_s = 54 GB/s / (bytes the pager moved host->device per decoded token); measured_bound_tokens_per_s uses "
            "h2d_copy_gb_per_s, one plain pinned 1 GiB copy_ measured in the same paged subprocess before the model loads",
            "prefill_timeline (paged and native): one more prefill after the measured run, with CUDA events at each "
            "decoder layer's start and end (GPU ms) and the host clock (host ms); not part of the timed figures",
            "prefill_kernel_profile (--profile, paged and native): one more prefill under torch.profiler; the kernels "
            "with the most device time and the host calls that synchronise or allocate",
            "allocator_retries: times the CUDA caching allocator freed its cache and retried in the measured run",
        ],
        "runs": results,
        "verdicts": verdicts,
        "wall_s": wall_s,
    })


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print_result_line(run_child(args))
        return 0
    from benchmarks.common import cuda_missing, print_table, write_results

    import transformers

    if cuda_missing("bench_long_context", args.device):
        return 2
    contexts = args.contexts
    kinds = args.runs
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for context in contexts:
        for kind in kinds:
            result = run_configuration(args, kind, context)
            results.append(result)
            summary = {k: result.get(k) for k in ("status", "time_to_first_token_s", "decode_tokens_per_s", "peak_gib", "wall_s")}
            print(f"[{time.perf_counter() - started:6.1f} s] {kind:10s} {context:6d}: {summary}", flush=True)
            # Written after every configuration: a run cut short still leaves what it measured.
            _write(args, results, judge(results, args), time.perf_counter() - started, write_results, transformers.__version__)
    verdicts = judge(results, args)
    rows = []
    for result in results:
        rows.append({
            "run": result["run"],
            "context": result["context"],
            "status": result.get("status"),
            "ttft_s": result.get("time_to_first_token_s"),
            "decode_tok_s": result.get("decode_tokens_per_s"),
            "peak_GiB": result.get("peak_gib"),
            "new_tokens": result.get("new_tokens"),
            "GB_h2d/token": result.get("gb_h2d_per_token"),
            "bound_tok_s": result.get("pcie_bound_tokens_per_s"),
            "kv_vram_GiB": result.get("kv_vram_gib"),
        })
    print_table(rows, ["run", "context", "status", "ttft_s", "decode_tok_s", "peak_GiB", "new_tokens", "GB_h2d/token", "bound_tok_s", "kv_vram_GiB"])
    for context, verdict in verdicts.items():
        print(f"context {context}: {verdict}")
    print(f"wrote {args.out}")
    # Exit 1 where a run failed: any run's error, or a paged run out of memory (a baseline's OOM is
    # a result); a target missed is in the JSON.
    return 1 if any(r.get("status") == "error" or (r["run"] == "paged" and r.get("status") != "ok")
                    for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
