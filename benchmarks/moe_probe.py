"""Where a paged mixture-of-experts decode token goes (an experiment).

The Mixtral shape of ``bench_weight_paging --experts N`` under its cap, weights paged with
``enable_paging(page_weights=True)``, advised as shipped. In one process, after one untimed
generate: decode tokens/s; the host functions with the most time over a few decode steps
(``cProfile``: blocking calls such as a ``tolist`` that waits on the GPU show with their wall
time); how many routed-expert windows the grouped matmul read as one view and how many it gathered
from scattered slots; and the device time of kernels and copies over the same steps
(``torch.profiler``).

    python -m benchmarks.moe_probe --experts 8 --layers 8 --kv-heads 8 --intermediate 14336 \
        --cap-gib 10 --margin-gib 2.5 --prompt 512 --tokens 6 --out /tmp/moe_probe.json
    python -m benchmarks.moe_probe --device cpu --experts 4 --layers 2 --hidden 256 --heads 4 \
        --intermediate 1024 --vocab 512 --cap-gib 1 --margin-gib 0 --page-size 64KiB --prompt 16 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import kernel_profile, write_results  # noqa: E402


def _count_windows() -> tuple[dict[str, int], Any]:
    """Count the windows of pages that ops read as one view of adjacent slots, those gathered from
    scattered slots into a buffer, and those copied straight from their runs of slots
    (``gather=False``: a row gather of rows a page or more), for routed experts of the grouped
    matmul (``grouped_mm._one_expert``) and for every other op (the batched experts' row gathers
    among them), by wrapping the window's constructor; the counts and a function that undoes it."""
    import pagedtensor.dispatch as dispatch
    import pagedtensor.handlers.grouped_mm as grouped_mm

    counts = {f"{who}_{how}": 0 for who in ("expert", "other") for how in ("view", "gathered", "copied_from_runs")}
    inside = {"expert": False}
    window_init, one_expert = dispatch._Window.__init__, grouped_mm._one_expert

    def counted_init(self, *args, **kwargs):
        window_init(self, *args, **kwargs)
        how = "view" if not self.gathered else ("gathered" if self._buf is not None else "copied_from_runs")  # gather=False
        counts[("expert_" if inside["expert"] else "other_") + how] += 1

    def counted_one_expert(*args, **kwargs):
        inside["expert"] = True
        try:
            return one_expert(*args, **kwargs)
        finally:
            inside["expert"] = False

    dispatch._Window.__init__, grouped_mm._one_expert = counted_init, counted_one_expert

    def undo() -> None:
        dispatch._Window.__init__, grouped_mm._one_expert = window_init, one_expert

    return counts, undo


def _time_host_slabs() -> list[tuple[float, float, int]]:
    """Record each slab the host tier grows, ``(perf_counter at start, seconds, bytes)`` (allocation
    and, on a CUDA machine, page-locking), by wrapping ``HostTier._allocate`` before any pager exists."""
    from pagedtensor.tiers.host import HostTier

    growths: list[tuple[float, float, int]] = []
    allocate = HostTier._allocate

    def timed(self, nbytes: int):
        start = time.perf_counter()
        slab = allocate(self, nbytes)
        growths.append((start, time.perf_counter() - start, nbytes))
        return slab

    HostTier._allocate = timed
    return growths


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_weight_paging import _cap, _enable_paged_weights, parse_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=6, help="decode tokens per measured generate (default 6)")
    own, rest = parser.parse_known_args(argv)
    args = parse_args(rest)
    import torch

    from benchmarks.bench_long_context import build_model
    from transformers import LogitsProcessorList

    from pagedtensor.hf import measure_generate

    result: dict[str, Any] = {"benchmark": "moe_probe", "command": " ".join(sys.argv), "tokens": own.tokens,
                              "model": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "intermediate",
                                                                      "experts", "experts_per_token", "page_size", "cap_gib", "margin_gib")}}  # fmt: skip
    generator = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(10, args.vocab, (1, args.prompt), generator=generator).to(args.device)
    growths = _time_host_slabs()
    load_start = time.perf_counter()
    model = build_model(args, args.prompt + 2 * own.tokens + 8)
    pager = _enable_paged_weights(args, model, result, "loop")
    result["load_s"] = round(time.perf_counter() - load_start, 3)  # the model built on the host, then paged
    _cap(args, result)
    kwargs: dict[str, Any] = dict(do_sample=False, attention_mask=torch.ones_like(prompt))
    measure_generate(model, prompt, pager=pager, max_new_tokens=2, **kwargs)

    step_times: list[float] = []

    def note_step(input_ids, scores):
        step_times.append(time.perf_counter())
        return scores

    def generate():
        step_times.clear()
        return measure_generate(model, prompt, pager=pager, max_new_tokens=own.tokens, min_new_tokens=own.tokens,
                                logits_processor=LogitsProcessorList([note_step]), **kwargs)  # fmt: skip

    loaded = time.perf_counter()
    measured = generate()
    result["host_slabs_grown"] = [{"s_after_load": round(at - loaded, 3), "seconds": round(seconds, 3), "gib": nbytes / 2**30}
                                  for at, seconds, nbytes in growths]  # fmt: skip
    result["measured_generate_s_after_load"] = [round(step_times[0] - loaded, 3), round(step_times[-1] - loaded, 3)] if step_times else None
    result["decode_tokens_per_s"] = measured.tokens_per_second
    result["gb_h2d_per_token"] = measured.paging["bytes_h2d_per_token"] / 1e9
    result["allocator_retries"] = measured.allocator_retries
    result["step_ms"] = [round((b - a) * 1e3, 1) for a, b in zip(step_times, step_times[1:])]
    result["tokens_out"] = measured.sequences[0, args.prompt :].tolist()

    counts, undo = _count_windows()
    profiler = cProfile.Profile()
    profiler.enable()
    generate()
    profiler.disable()
    undo()
    result["expert_windows"] = counts
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    result["cprofile"] = text.getvalue().splitlines()
    result["kernels"] = kernel_profile(generate, top=30)
    write_results(args.out, result)
    print("\n".join(result["cprofile"][:140]))
    print({k: result[k] for k in ("decode_tokens_per_s", "gb_h2d_per_token", "allocator_retries", "step_ms", "expert_windows",
                                  "host_slabs_grown", "measured_generate_s_after_load", "load_s")})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
