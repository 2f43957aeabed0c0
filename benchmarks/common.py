"""What every benchmark records beside its numbers: where, when, which code, and how it was run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Any

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
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return meta


def write_results(path: str, results: dict[str, Any]) -> None:
    """Write ``results`` (with run metadata first) as indented JSON to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({**run_metadata(), **results}, handle, indent=2)
        handle.write("\n")


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


def meta_llama(args: Any, max_positions: int):
    """A Llama (``args``: layers, hidden, heads, intermediate, vocab) with MHA, SDPA attention and fp16
    parameters on the meta device: the benchmarks place and fill it themselves, with no CPU copy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(4096, max_positions),
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
