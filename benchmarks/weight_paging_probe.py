"""Where a paged-weights decode token goes: host time against the host→device link (an experiment).

The Llama-2-7B shape of ``bench_weight_paging`` under its cap, weights advised ``"loop"``. Measures,
in one process: decode tokens/s; per decode step, when each decoder layer starts on the host clock
and on the GPU (a CUDA event recorded by a forward pre-hook), so a host that waits on the GPU shows
as a host start that follows the GPU's; the device time of the host→device copies and of the compute
kernels in two decode steps (``torch.profiler``) with the host calls that synchronise; the host
functions with the most time in two decode steps (``cProfile``); and decode tokens/s with the
layer-ahead prefetch hooks removed.

    python -m benchmarks.weight_paging_probe --out /tmp/probe.json
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


def _layer_starts(model) -> tuple[list, list]:
    """Forward pre-hooks on every decoder layer noting (host seconds, CUDA event, the thread's CPU
    seconds) at its start."""
    import torch

    marks: list[tuple[float, Any, float]] = []

    def note(module, args):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((time.perf_counter(), event, time.thread_time()))

    handles = [layer.register_forward_pre_hook(note) for layer in model.model.layers]
    return marks, handles


def _timed_layer_starts(model, generate) -> list[dict[str, list[float]]]:
    """Per decode step of ``generate()``: each decoder layer's start on the host clock, on the GPU
    and in the host thread's CPU time, relative to the step's first layer (ms), and the garbage
    collector's pauses in the step (a host slower in wall time than in CPU time waits, in a
    blocking call or for the CPU; one slower in CPU time does more work or runs slower)."""
    import gc

    import torch

    pauses: list[tuple[float, float]] = []
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses.append((started.pop(), time.perf_counter()))

    marks, handles = _layer_starts(model)
    gc.callbacks.append(on_gc)
    try:
        generate()
    finally:
        gc.callbacks.remove(on_gc)
        for handle in handles:
            handle.remove()
    torch.cuda.synchronize()
    layers = len(model.model.layers)
    steps = []
    for step in range(1, len(marks) // layers):  # step 0 is the prefill
        chunk = marks[step * layers : (step + 1) * layers]
        host0, event0, cpu0 = chunk[0]
        end = marks[(step + 1) * layers][0] if (step + 1) * layers < len(marks) else float("inf")
        steps.append({
            "host_ms": [round((host - host0) * 1e3, 2) for host, _, _ in chunk],
            "gpu_ms": [round(event0.elapsed_time(event), 2) for _, event, _ in chunk],
            "cpu_ms": [round((cpu - cpu0) * 1e3, 2) for _, _, cpu in chunk],
            "gc_pause_ms": round(sum(b - a for a, b in pauses if host0 <= a < end) * 1e3, 2),
        })
    return steps


def _sample_main_thread(fn, interval_s: float = 0.0005, depth: int = 4) -> list[tuple[str, int]]:
    """Run ``fn()`` while a thread samples the calling thread's innermost ``depth`` frames every
    ``interval_s`` (the sampler runs whenever the caller waits in a call that releases the GIL, so
    blocking calls show with their wall time); the most frequent stacks with their sample counts."""
    import collections
    import threading

    target = threading.get_ident()
    counts: collections.Counter = collections.Counter()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            frame = sys._current_frames().get(target)
            stack = []
            while frame is not None and len(stack) < depth:
                stack.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}:{frame.f_code.co_name}")
                frame = frame.f_back
            counts[" <- ".join(stack)] += 1
            time.sleep(interval_s)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
        sys.setswitchinterval(switch)
    return counts.most_common(40)


def _copy_timeline(model, prompt, kwargs, tokens: int = 4) -> dict[str, Any]:
    """Profile a generate of ``tokens`` tokens and, over its decode steps (after a marker the first
    step's logits processor records), read the host→device copy engine's timeline: how busy it is,
    and for each idle gap before a copy whether that copy was asked for late (its
    ``cudaMemcpyAsync`` ran after the previous copy had finished: the host was elsewhere) or early
    (it waited on an event: a dependency), with which threads asked for the copies."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import LogitsProcessorList

    class Mark:
        calls = 0

        def __call__(self, input_ids, scores):
            Mark.calls += 1
            if Mark.calls == 1:
                with record_function("decode_start"):
                    pass
            return scores

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, logits_processor=LogitsProcessorList([Mark()]), **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = prof.profiler.kineto_results.events()
    start = min((e.start_ns() for e in events if e.name() == "decode_start"), default=0)
    calls = {}
    copies = []
    kernels_busy = 0
    for e in events:
        on_device = str(e.device_type()).endswith("CUDA")
        if not on_device and e.name() == "cudaMemcpyAsync":
            calls[e.correlation_id()] = (e.start_ns(), e.start_thread_id())
        elif on_device and e.start_ns() >= start:
            if e.name().startswith("Memcpy HtoD"):
                copies.append((e.start_ns(), e.end_ns(), e.correlation_id(), e.linked_correlation_id()))
            elif not e.name().startswith("Memcpy"):
                kernels_busy += e.duration_ns()
    copies.sort()
    busy = sum(end - begin for begin, end, *_ in copies)
    window = (copies[-1][1] - copies[0][0]) if copies else 0
    late = waited = 0
    late_gaps = waited_gaps = 0
    threads: dict[int, int] = {}
    unmatched = 0
    for previous, copy in zip(copies, copies[1:]):
        call = calls.get(copy[2]) or calls.get(copy[3])
        if call is None:
            unmatched += 1
            continue
        threads[call[1]] = threads.get(call[1], 0) + 1
        gap = copy[0] - previous[1]
        if gap <= 5000:
            continue
        if call[0] > previous[1]:
            late += gap
            late_gaps += 1
        else:
            waited += gap
            waited_gaps += 1
    return {
        "decode_steps": tokens - 1,
        "h2d_copies": len(copies),
        "h2d_busy_ms": busy / 1e6,
        "h2d_window_ms": window / 1e6,
        "h2d_busy_fraction": busy / window if window else None,
        "compute_kernels_busy_ms": kernels_busy / 1e6,
        "idle_before_copies_asked_late_ms": late / 1e6,
        "idle_gaps_asked_late": late_gaps,
        "idle_before_copies_that_waited_ms": waited / 1e6,
        "idle_gaps_waited": waited_gaps,
        "copies_by_host_thread": {str(k): v for k, v in threads.items()},
        "copies_without_their_call": unmatched,
    }


def _remove_prefetch_hooks(model) -> list:
    """Remove enable_paging's layer-ahead prefetch hooks from the decoder layers; the layers."""
    from pagedtensor.hf import paging_state

    layers = list(model.model.layers)
    installed = {key for layer in layers for key in layer._forward_pre_hooks}
    for handle in [handle for handle in paging_state(model).hooks if handle.id in installed]:
        handle.remove()
    return layers


def _replace_prefetch_hooks(model, pager, depth: int, prefetch) -> list:
    """Remove enable_paging's layer-ahead prefetch hooks and give each decoder layer a pre-hook that
    calls ``prefetch(allocations)`` for each of the next ``depth`` layers with its weights not wholly
    on the device, as ``enable_paging``'s hook does for one (none with ``depth`` 0); the new hooks'
    handles."""
    from pagedtensor.hf.model import _weight_allocations

    layers = _remove_prefetch_hooks(model)

    def ahead(index: int):
        upcoming = [layers[(index + k) % len(layers)] for k in range(1, depth + 1)]

        def hook(module, args):
            for layer in upcoming:
                missing = [allocation for allocation in _weight_allocations(layer, pager)
                           if any(page.device_slot is None for page in allocation.pages)]  # fmt: skip
                if missing:
                    prefetch(missing)
        return hook

    return [layer.register_forward_pre_hook(ahead(index)) for index, layer in enumerate(layers)] if depth else []


def _lookahead_hooks(model, pager) -> list:
    """Replace enable_paging's layer-ahead prefetch hooks by ones that keep one prefetch ahead of
    the layer running, however far: at a layer's start, when the layer last prefetched has been
    reached, prefetch the next layer (cyclically) with weights not wholly on the device, if any.
    Across layers that stay resident the link then brings the next streamed layer in early,
    instead of idling until the layer before it; the handles of the new hooks."""
    from pagedtensor.hf.model import _weight_allocations

    layers = _remove_prefetch_hooks(model)
    ahead: dict[str, Any] = {"layer": None}
    weights = [_weight_allocations(layer, pager) for layer in layers]

    def hook_for(index: int):
        def hook(module, args):
            if ahead["layer"] is not None and ahead["layer"] != index:
                return  # the layer prefetched last is still ahead
            ahead["layer"] = None
            for step in range(1, len(layers)):
                upcoming = (index + step) % len(layers)
                missing = [a for a in weights[upcoming] if any(page.device_slot is None for page in a.pages)]
                if missing:
                    pager.prefetch_together(missing)
                    ahead["layer"] = upcoming
                    return
        return hook

    return [layer.register_forward_pre_hook(hook_for(index)) for index, layer in enumerate(layers)]


def _spread(count: int, total: int) -> list[int]:
    """``count`` indices of ``range(total)`` spread evenly (Bresenham), so runs of the others are short."""
    return [index for index in range(total) if (index + 1) * count // total > index * count // total]


def _interleave(model, pager, resident_layers: int) -> dict[str, Any]:
    """Advise the weights of ``resident_layers`` decoder layers spread evenly over the model
    ``"normal"`` (they leave after every loop page, so they stay) and the others' ``"loop"``, so the
    layers streamed each token alternate with resident ones and their copies overlap the resident
    layers' host work, instead of forming one stretch where the host waits on the link while the
    link idles across the resident stretch (an experiment); which layers stay."""
    from pagedtensor.hf import paging_state

    weights = paging_state(model).weight_allocations
    kept = set(_spread(resident_layers, len(weights)))
    for index, allocations in enumerate(weights):
        for allocation in allocations:
            pager.advise(allocation, "normal" if index in kept else "loop")
    return {"resident_layers": sorted(kept)}


def _decode_figures(measured) -> dict[str, float]:
    return {"decode_tokens_per_s": measured.tokens_per_second, "gb_h2d_per_token": measured.paging["bytes_h2d_per_token"] / 1e9}


def _timed_decode(model, prompt, pager, tokens: int, kwargs: dict) -> dict[str, float]:
    """Decode tokens/s and GB host→device a token of one generate of ``tokens`` tokens."""
    from pagedtensor.hf import measure_generate

    return _decode_figures(measure_generate(model, prompt, pager=pager, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs))


def _time_depth(cli, model, pager, prompt, kwargs, result) -> int:
    """Decode tokens/s with each layer's pre-hook prefetching the next ``cli.depth`` layers."""
    from pagedtensor.hf import measure_generate

    _replace_prefetch_hooks(model, pager, cli.depth, pager.prefetch_together)
    measure_generate(model, prompt, pager=pager, max_new_tokens=2, **kwargs)
    rows = [_timed_decode(model, prompt, pager, cli.tokens, kwargs) for _ in range(2)]
    result.update(page_size=cli.page_size, depth=cli.depth, runs=rows)
    write_results(cli.out, result)
    print(cli.page_size, cli.depth, rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cap-gib", type=float, default=8.0)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--page-size", default="4MiB")
    parser.add_argument("--depth", type=int, default=0,
                        help="only time decode with the prefetch hooks replaced by ones reaching DEPTH layers ahead (0: the full probe)")
    parser.add_argument("--advice", default="loop", choices=["loop", "normal"], help="how the weights are advised (default loop)")
    parser.add_argument("--lookahead", action="store_true",
                        help="only time decode with the shipped hooks, then with hooks keeping one prefetch ahead however far (an experiment)")
    parser.add_argument("--interleave", default="",
                        help="only time decode as shipped, then with N layers spread over the model kept resident and the others "
                             "streamed (comma-separated Ns; an experiment)")
    parser.add_argument("--layer-times", action="store_true",
                        help="only time each decoder layer's start (host, GPU, host CPU) over 5 decode steps, with the garbage "
                             "collector on, then off")
    parser.add_argument("--timeline", action="store_true", help="only read the host-to-device copy engine's timeline over 3 decode steps")
    cli = parser.parse_args(argv)
    import torch

    from benchmarks.bench_long_context import build_model
    from benchmarks.bench_weight_paging import _cap, _enable_paged_weights, parse_args
    from pagedtensor.hf import measure_generate, paging_state

    args = parse_args(["--cap-gib", str(cli.cap_gib), "--prompt", "1024", "--page-size", cli.page_size])
    result: dict[str, Any] = {"benchmark": "weight_paging_probe"}
    model = build_model(args, args.prompt + 64)
    pager = _enable_paged_weights(args, model, result, cli.advice)
    _cap(args, result)
    prompt = torch.randint(10, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1)).cuda()
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(prompt))

    def timed() -> dict[str, float]:
        return _timed_decode(model, prompt, pager, cli.tokens, kwargs)

    if cli.depth:
        return _time_depth(cli, model, pager, prompt, kwargs, result)
    if cli.lookahead:
        measure_generate(model, prompt, pager=pager, max_new_tokens=2, **kwargs)
        shipped = [timed() for _ in range(2)]
        _lookahead_hooks(model, pager)
        measure_generate(model, prompt, pager=pager, max_new_tokens=2, **kwargs)
        lookahead = [timed() for _ in range(2)]
        result.update(page_size=cli.page_size, shipped=shipped, lookahead=lookahead)
        write_results(cli.out, result)
        print("shipped", shipped, "lookahead", lookahead)
        return 0
    if cli.interleave:
        measure_generate(model, prompt, pager=pager, max_new_tokens=2, **kwargs)
        rows = [{"shipped": True, **timed()} for _ in range(2)]
        for count in [int(n) for n in cli.interleave.split(",")]:
            layout = _interleave(model, pager, count)
            measure_generate(model, prompt, pager=pager, max_new_tokens=4, **kwargs)  # the layout settles
            rows += [{**layout, **timed()} for _ in range(2)]
            print(rows[-2:])
        for allocations in paging_state(model).weight_allocations:  # as shipped again
            for allocation in allocations:
                pager.advise(allocation, cli.advice)
        measure_generate(model, prompt, pager=pager, max_new_tokens=4, **kwargs)
        rows += [{"shipped": True, **timed()} for _ in range(2)]
        result.update(page_size=cli.page_size, interleave=rows)
        write_results(cli.out, result)
        print(rows)
        return 0
    if cli.layer_times:
        import gc

        measure_generate(model, prompt, pager=pager, max_new_tokens=2, **kwargs)
        def generate() -> None:
            measure_generate(model, prompt, pager=pager, max_new_tokens=6, min_new_tokens=6, **kwargs)

        result["gc_enabled"] = _timed_layer_starts(model, generate)
        gc.collect()
        gc.disable()
        try:
            result["gc_disabled"] = _timed_layer_starts(model, generate)
        finally:
            gc.enable()
        write_results(cli.out, result)
        for key in ("gc_enabled", "gc_disabled"):
            for step in result[key]:
                print(key, "host", step["host_ms"][-1], "cpu", step["cpu_ms"][-1], "gpu", step["gpu_ms"][-1], "gc", step["gc_pause_ms"])
        return 0
    if cli.timeline:
        measure_generate(model, prompt, pager=pager, max_new_tokens=2, **kwargs)
        result["copy_timeline"] = _copy_timeline(model, prompt, kwargs)
        write_results(cli.out, result)
        print(result["copy_timeline"])
        return 0
    measure_generate(model, prompt, pager=pager, max_new_tokens=2, **kwargs)

    measured = measure_generate(model, prompt, pager=pager, max_new_tokens=cli.tokens, min_new_tokens=cli.tokens, **kwargs)
    result["decode_tokens_per_s"] = measured.tokens_per_second
    result["gb_h2d_per_token"] = measured.paging["bytes_h2d_per_token"] / 1e9

    # Per decode step: host, GPU and host CPU start of each layer, relative to the step's first layer.
    result["decode_layer_starts"] = _timed_layer_starts(
        model, lambda: measure_generate(model, prompt, pager=pager, max_new_tokens=4, min_new_tokens=4, **kwargs))

    result["profile_two_steps"] = kernel_profile(lambda: model.generate(prompt, max_new_tokens=3, min_new_tokens=3, **kwargs), top=15)

    profiler = cProfile.Profile()
    profiler.enable()
    model.generate(prompt, max_new_tokens=3, min_new_tokens=3, **kwargs)
    profiler.disable()
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(45)
        result[f"cprofile_{order}"] = text.getvalue().splitlines()[:75]

    result["sampled_stacks"] = _sample_main_thread(
        lambda: model.generate(prompt, max_new_tokens=5, min_new_tokens=5, **kwargs))
    torch.cuda.synchronize()

    _replace_prefetch_hooks(model, pager, 0, None)
    measured = measure_generate(model, prompt, pager=pager, max_new_tokens=cli.tokens, min_new_tokens=cli.tokens, **kwargs)
    result["no_prefetch"] = _decode_figures(measured)
    # (Files before ed515fc also hold "inline_prefetch": the prefetch issued on the calling thread,
    # which is what the shipped hook does since, when no disk I/O is needed.)
    result["stats"] = {k: v for k, v in pager.stats().items() if not isinstance(v, dict)}
    write_results(cli.out, result)
    print({k: result[k] for k in ("decode_tokens_per_s", "gb_h2d_per_token", "no_prefetch")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
