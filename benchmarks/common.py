"""What every benchmark records beside its numbers: where, when, which code, and how it was run."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Optional

import torch


def git_commit() -> str:
    """The checked-out commit, with ``-dirty`` when tracked files differ from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PAGEDLLM_COMMIT", "unknown")
    return commit + ("-dirty" if dirty else "")


def run_metadata() -> dict[str, Any]:
    """Device, versions, commit, date and the exact command line of this run."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    meta: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get("PAGEDLLM_COMMIT") or git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    settings = {name: os.environ[name] for name in ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES") if name in os.environ}
    if settings:
        meta["environment"] = settings
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return meta


def add_device_argument(parser: Any) -> None:
    """``--device cuda`` (the default), or ``cpu``: the CPU as the device tier, a smoke check of the
    script, not a measurement."""
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke check of the script only")


def cuda_missing(script: str, device: str) -> bool:
    """Whether ``device`` is ``cuda`` and this machine has none (then said on stderr)."""
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{script}: needs a CUDA device (or --device cpu for a smoke check)", file=sys.stderr)
        return True
    return False


def write_results(path: str, results: dict[str, Any]) -> None:
    """Write ``results`` (with run metadata first) as indented JSON to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({**run_metadata(), **results}, handle, indent=2)
        handle.write("\n")


RESULT_PREFIX = "BENCH_RESULT "
"""A configuration's subprocess prints its result as one JSON line after this prefix."""


def print_result_line(result: dict[str, Any]) -> None:
    """What a configuration's subprocess prints last: its result for :func:`run_configuration_process`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_configuration_process(command: list[str], timeout: int, identity: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration's subprocess (from the repository root) and return the result it printed
    with :func:`print_result_line`, plus ``wall_s``; or ``identity`` with ``status`` ``"timeout"``,
    ``"oom"`` or ``"error"`` and the tail of its output when it printed none."""
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=repo_root())
    except subprocess.TimeoutExpired:
        return {**identity, "status": "timeout", "wall_s": timeout}
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result["wall_s"] = time.perf_counter() - start
            return result
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-12:]
    status = "oom" if any("OutOfMemory" in line or "out of memory" in line for line in tail) else "error"
    return {**identity, "status": status, "returncode": completed.returncode, "error": "\n".join(tail)[-2000:]}


# argparse ``type=`` functions: a bad value ends the program with argparse's message, which names the
# argument and the value (exit status 2), before any pager or model is built.


def _number_type(convert: Callable[[str], Any], noun: str, lowest: float, above: bool, use: str) -> Callable[[str], Any]:
    """An argparse ``type=`` reading ``convert(text)``: a finite number at least ``lowest`` (above
    it where ``above``), else argparse's error naming the value."""
    bound = f"above {lowest:g}" if above else f"at least {lowest:g}"

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not math.isfinite(value) or value < lowest or (above and value == lowest):
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun} {bound}")
        return value

    parse.__name__ = f"{noun} {bound}"  # argparse's own messages name the type by it
    parse.__doc__ = f"{noun.capitalize()} {bound} ({use})."
    return parse


positive_int = _number_type(int, "a whole number", 1, False, "a count: repeats, layers, tokens, seconds")
nonnegative_int = _number_type(int, "a whole number", 0, False, "a count that may be none")
positive_float = _number_type(float, "a number", 0, True, "a size in GiB, a memory cap")
nonnegative_float = _number_type(float, "a number", 0, False, "a margin in GiB")


def positive_int_list(text: str) -> list[int]:
    """Comma-separated whole numbers, each at least 1, at least one of them ("1,2,4")."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} names no number")
    values = []
    for item in items:
        try:
            values.append(positive_int(item))
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{error} (in {text!r})") from None
    return values


def name_list(known: Iterable[str], aliases: Optional[dict[str, str]] = None, at_least_one: bool = False) -> Callable[[str], list[str]]:
    """An argparse ``type=`` for a comma-separated subset of ``known`` ("" is none, refused where
    ``at_least_one``: ``--runs``); a name in ``aliases`` is read as the name it maps to (an older spelling)."""
    known = tuple(known)
    aliases = dict(aliases or {})

    def parse(text: str) -> list[str]:
        names = [aliases.get(name, name) for name in (item.strip() for item in text.split(",")) if name]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))} in {text!r}; choose from {', '.join(known)}")
        if at_least_one and not names:
            raise argparse.ArgumentTypeError(f"{text!r} names none; choose from {', '.join(known)}")
        return names

    parse.__name__ = "name list"  # argparse's own messages name the type by it
    return parse


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """One plain-text table."""
    cells = [[_format(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def repo_root() -> str:
    """The repository's root folder (the parent of ``benchmarks/``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def add_llama_shape_arguments(parser: Any, experts: bool = False) -> None:
    """``--layers``, ``--hidden``, ``--heads``, ``--intermediate``, ``--vocab``: the model of
    :func:`meta_llama`, Llama-2-7B's shape by default; with ``experts``, also ``--experts``,
    ``--experts-per-token`` and ``--kv-heads`` (a Mixtral shape)."""
    parser.add_argument("--layers", type=positive_int, default=32, help="decoder layers (default 32: Llama-2-7B)")
    parser.add_argument("--hidden", type=positive_int, default=4096, help="hidden size (default 4096)")
    parser.add_argument("--heads", type=positive_int, default=32, help="attention heads = kv heads (default 32)")
    parser.add_argument("--intermediate", type=positive_int, default=11008, help="MLP size (default 11008)")
    parser.add_argument("--vocab", type=positive_int, default=32000, help="vocabulary (default 32000)")
    if experts:
        parser.add_argument("--experts", type=nonnegative_int, default=0, help="experts per layer: a Mixtral (default 0: a dense Llama)")
        parser.add_argument("--experts-per-token", type=positive_int, default=2, help="experts a token is routed to (default 2)")
        parser.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (default: --heads)")


def meta_llama(args: Any, max_positions: int):
    """A Llama (``args``: layers, hidden, heads, intermediate, vocab) with MHA, SDPA attention and fp16
    parameters on the meta device: the benchmarks place and fill it themselves, with no CPU copy.
    With ``args.experts`` (and ``experts_per_token``, ``kv_heads``) a Mixtral of that shape in bf16
    instead, its experts run by transformers' default ``grouped_mm``."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    experts = getattr(args, "experts", 0)
    config_class, model_class = (MixtralConfig, MixtralForCausalLM) if experts else (LlamaConfig, LlamaForCausalLM)
    extra = dict(num_local_experts=experts, num_experts_per_tok=args.experts_per_token, sliding_window=None) if experts else {}
    kv_heads = getattr(args, "kv_heads", None) or args.heads
    config = config_class(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(4096, max_positions),
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        tie_word_embeddings=False,
        **extra,
    )
    config._attn_implementation = "sdpa"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if experts else torch.float16)  # Mixtral ships in bf16
    try:
        with torch.device("meta"):
            return model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)


class LayerTimeline:
    """Where the first forward after :meth:`start` (a prefill) spends its time, layer by layer.

    Forward pre/post hooks on ``model`` and on each of ``layers`` note the host clock and, on CUDA,
    record timing events on the current stream. After the forward (and a synchronize, which
    ``measure_generate`` does), :meth:`summary` gives per layer the GPU time between its events and
    the host time between its hooks, plus the time before the first layer (embeddings, masks,
    rotary tables) and after the last (final norm, ``lm_head``). A layer whose host time exceeds its
    GPU time kept the GPU waiting on Python; the GPU times compared side by side between a paged and
    an unpaged run show which layers (the first ones whose KV fits, the later ones that evict) carry
    a gap.

    Note:
        Events are recorded on the current stream when the hook runs: no host synchronization is
        added, so the timed forward runs as it would untimed.
    """

    def __init__(self, model: torch.nn.Module, layers: list) -> None:
        self.cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
        self.recording = False
        self.marks: list[tuple[str, int, float, Any]] = []  # (kind, layer or -1, host seconds, event or None)
        self.handles = [model.register_forward_pre_hook(self._hook("model_start", -1)),
                        model.register_forward_hook(self._model_end)]
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._hook("layer_start", index)))
            self.handles.append(layer.register_forward_hook(self._hook("layer_end", index)))

    def start(self) -> None:
        """Record the next forward (only that one)."""
        self.marks = []
        self.recording = True

    def _mark(self, kind: str, index: int) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((kind, index, time.perf_counter(), event))

    def _hook(self, kind: str, index: int):
        def hook(*_args: Any) -> None:
            if self.recording:
                self._mark(kind, index)

        return hook

    def _model_end(self, *_args: Any) -> None:
        if self.recording:
            self._mark("model_end", -1)
            self.recording = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def summary(self) -> dict[str, Any]:
        """Milliseconds: per layer (GPU on CUDA, host always), before the first layer and after the last."""
        if not self.marks or self.marks[0][0] != "model_start" or self.marks[-1][0] != "model_end":
            return {"complete": False}
        if self.cuda:
            torch.cuda.synchronize()
        starts = {index: (host, event) for kind, index, host, event in self.marks if kind == "layer_start"}
        ends = {index: (host, event) for kind, index, host, event in self.marks if kind == "layer_end"}
        layers = sorted(set(starts) & set(ends))
        if not layers:
            return {"complete": False}
        (_, _, model_host0, model_event0), (_, _, model_host1, model_event1) = self.marks[0], self.marks[-1]

        def gpu_ms(a: Any, b: Any) -> Optional[float]:
            return a.elapsed_time(b) if a is not None and b is not None else None

        def rounded(values: list) -> list:
            return [None if v is None else round(v, 3) for v in values]

        layer_gpu = [gpu_ms(starts[i][1], ends[i][1]) for i in layers]
        layer_host = [(ends[i][0] - starts[i][0]) * 1e3 for i in layers]
        first, last = layers[0], layers[-1]
        return {
            "complete": True,
            "layers": len(layers),
            "total_gpu_ms": gpu_ms(model_event0, model_event1),
            "total_host_ms": (model_host1 - model_host0) * 1e3,
            "before_layers_gpu_ms": gpu_ms(model_event0, starts[first][1]),
            "after_layers_gpu_ms": gpu_ms(ends[last][1], model_event1),
            "before_layers_host_ms": (starts[first][0] - model_host0) * 1e3,
            "after_layers_host_ms": (model_host1 - ends[last][0]) * 1e3,
            "layers_gpu_ms_sum": None if None in layer_gpu else sum(layer_gpu),
            "layers_host_ms_sum": sum(layer_host),
            "layer_gpu_ms": rounded(layer_gpu),
            "layer_host_ms": rounded(layer_host),
        }


SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaFree", "cudaMalloc",
              "cudaHostAlloc", "cudaFreeHost", "cudaMemcpy")


def kernel_profile(fn: Any, top: int = 25) -> dict[str, Any]:
    """Run ``fn()`` once under ``torch.profiler`` and summarise where the device time went.

    Returns the ``top`` device kernels and copies by total device time (name, calls, ms), the total
    device time of all of them, the count of host calls that synchronise or (re)allocate memory
    (``cudaStreamSynchronize``, ``cudaFree``, ...): a prefill that should run ahead of the GPU and
    makes such calls is stalling, and every CUDA runtime call with its count and host ms. On a
    CPU-only machine the kernel and call lists are empty.

    Note:
        The profiler adds host overhead; compare the device times, not the wall time, between runs.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    averages = prof.key_averages()

    def device_us(event: Any) -> float:
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0) or 0.0)

    kernels = []
    host_calls: dict[str, int] = {}
    runtime: dict[str, dict[str, float]] = {}
    for event in averages:
        if event.key in SYNC_CALLS or any(event.key.startswith(name) for name in SYNC_CALLS):
            host_calls[event.key] = host_calls.get(event.key, 0) + int(event.count)
        if str(getattr(event, "device_type", "")).endswith("CUDA") and device_us(event) > 0:
            kernels.append({"name": event.key[:160], "calls": int(event.count), "device_ms": round(device_us(event) / 1e3, 3)})
        elif event.key.startswith("cuda"):
            runtime[event.key] = {"calls": int(event.count), "host_ms": round(float(event.self_cpu_time_total) / 1e3, 3)}
    kernels.sort(key=lambda row: row["device_ms"], reverse=True)
    return {
        "wall_ms_profiled": round(wall_ms, 1),
        "device_ms_total": round(sum(row["device_ms"] for row in kernels), 1),
        "top": kernels[:top],
        "host_sync_and_alloc_calls": host_calls,
        "cuda_runtime_calls": runtime,
    }


def pinned_h2d_gb_per_s(nbytes: int = 2**30, repeats: int = 5) -> Optional[float]:
    """Bandwidth of one plain pinned host→device ``copy_`` of ``nbytes`` (GB/s, CUDA events), the
    baseline a paged run's host→device traffic is judged against in the same run; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        device.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del host, device
    torch.cuda.empty_cache()
    return nbytes / seconds / 1e9
