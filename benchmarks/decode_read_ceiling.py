"""How fast can any kernel read the KV bytes of the short decode shapes? An experiment, not a product path.

The decode shapes still under 80% of copy bandwidth back to back (results/paged_attention_h200.json)
are the small ones: Llama-3-8B batch 1 at 8K (32 MiB of KV) and Llama-2-7B batch 1 at 8K and
Llama-3-8B batch 1 at 32K (128 MiB each). ``decode_merge_variants.py`` showed that even the split
kernel alone, with no merge, stays under 80% on two of them. This script asks whether *reading* the
same bytes can go faster at all, timed exactly as the benchmark times decode (calls back to back in
one CUDA graph, rotating among copies that together exceed twice the L2, so each call reads cold
bytes), and sweeps each reader's launch parameters:

- ``contiguous``: one flat buffer of the same size, each program sums one contiguous chunk (the best
  case for the memory system: no page table, no strided rows).
- ``paged_rows``: the decode kernel's own addressing (each program reads one KV head's 256-byte rows
  of its context split through the block table) but only sums them: the layout's cost without the
  attention math.
- ``paged_rows_tma``: the same rows, one page of one head per Hopper TMA box (``TensorDescriptor``),
  pipelined ``num_stages`` deep.
- ``decode_tma``: the decode split kernel with its K/V loads as those TMA boxes (one page a step),
  plus the shipped merge; checked against the shipped call.
- ``shipped`` (the public call) and ``shipped_split_only`` (its split kernel, no merge), and
  ``torch.sum`` of the same bytes, for reference in the same run.
- ``shipped_kernels_*`` (``--parts split``): the shipped split kernel, alone and with the merge, under
  other launch parameters (loop step, warps, stages including 1, split counts of 2-8 programs per SM).

Run: ``python3 benchmarks/decode_read_ceiling.py --out PATH [--parts readers,split] [--readers ...] [--shapes
model:batch:context,...] [--timing graph|sustained]`` on a CUDA machine (about 1.5 minutes a part). ``--timing
sustained`` replays each graph of calls back to back for 0.1 s instead of timing it with ``do_bench`` (whose
L2 flush and graph launch fall inside every graph: ~1.2 us a call on the H200), against the copy issued
back to back alike.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable

import torch
import triton
import triton.language as tl

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_paged_attention import (  # noqa: E402
    MODELS,
    copy_bandwidth_gbs,
    copy_bandwidth_sustained_gbs,
    gb_per_s,
    graph_us,
    make_paged_kv,
    rotated,
    sustained_us,
)
from benchmarks.common import write_results  # noqa: E402

from pagedtensor.triton_kernels import decode_attention as da  # noqa: E402
from pagedtensor.triton_kernels._common import dot_options, kv_pool_strides, next_power_of_2, resolve_scale  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: the TMA variants are reported as errors
    TensorDescriptor = None

SHAPES = [("llama3-8b", 1, 8192), ("llama2-7b", 1, 8192), ("llama3-8b", 1, 32768)]
PAGE_TOKENS = 16
BACK_TO_BACK_CALLS = 8
TIMING = {"mode": "graph"}  # "graph": do_bench of the graph of calls; "sustained": that graph replayed back to back
READERS = ("contiguous", "paged_rows", "paged_rows_tma", "decode_tma")


@triton.jit
def _read_contiguous_kernel(x_ptr, out_ptr, n_elements, chunk, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, n_elements)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _read_paged_rows_kernel(k_pages_ptr, v_pages_ptr, block_table_ptr, out_ptr, num_kv_heads, seq_len, tokens_per_split,
                            stride_k_page, stride_k_token, stride_k_head, stride_v_page, stride_v_token, stride_v_head,
                            stride_bt_batch, HEAD_DIM: tl.constexpr, PAGE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_seq_head = tl.program_id(0)
    split = tl.program_id(1)
    batch = (pid_seq_head // num_kv_heads).to(tl.int64)
    kv_head = (pid_seq_head % num_kv_heads).to(tl.int64)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(block_table_ptr + batch * stride_bt_batch + offs_n // PAGE_TOKENS, mask=mask_n, other=0).to(tl.int64)
        slot = (offs_n % PAGE_TOKENS).to(tl.int64)
        k = tl.load(k_pages_ptr + kv_head * stride_k_head + (page * stride_k_page + slot * stride_k_token)[:, None]
                    + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(v_pages_ptr + kv_head * stride_v_head + (page * stride_v_page + slot * stride_v_token)[:, None]
                    + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(out_ptr + pid_seq_head * tl.num_programs(1) + split, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _read_paged_rows_tma_kernel(k_desc, v_desc, block_table_ptr, out_ptr, num_kv_heads, seq_len, tokens_per_split,
                                stride_bt_batch, HEAD_DIM: tl.constexpr, PAGE_TOKENS: tl.constexpr, STAGES: tl.constexpr):
    pid_seq_head = tl.program_id(0)
    split = tl.program_id(1)
    batch = pid_seq_head // num_kv_heads
    kv_head = pid_seq_head % num_kv_heads
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    acc = tl.zeros([PAGE_TOKENS, HEAD_DIM], tl.float32)
    for n0 in tl.range(start, end, PAGE_TOKENS, num_stages=STAGES):
        page = tl.load(block_table_ptr + batch * stride_bt_batch + n0 // PAGE_TOKENS)
        k = k_desc.load([page * PAGE_TOKENS, kv_head * HEAD_DIM])
        v = v_desc.load([page * PAGE_TOKENS, kv_head * HEAD_DIM])
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(out_ptr + pid_seq_head * tl.num_programs(1) + split, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _decode_split_tma_kernel(q_ptr, k_desc, v_desc, block_table_ptr, seq_lens_ptr, out_ptr, lse_ptr, qk_scale_log2,
                             num_kv_heads, tokens_per_split, stride_q_batch, stride_q_head, stride_bt_batch,
                             stride_out_batch, stride_out_head, stride_out_split, stride_lse_batch, stride_lse_head,
                             stride_lse_split, QUERY_GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                             HEAD_DIM: tl.constexpr, PAGE_TOKENS: tl.constexpr, STAGES: tl.constexpr,
                             DOT_PRECISION: tl.constexpr):
    """The shipped split kernel (its own prologue, block step and epilogue) with each step's K and V
    loaded as one TMA box of one page of one head."""
    batch, kv_head, split, start, end, heads, mask_g, offs_d, q = da._split_program(
        q_ptr, seq_lens_ptr, num_kv_heads, tokens_per_split, stride_q_batch, stride_q_head, QUERY_GROUP, BLOCK_G, HEAD_DIM)
    column = (kv_head * HEAD_DIM).to(tl.int32)
    m_i, l_i, acc = da._empty_state(BLOCK_G, HEAD_DIM)
    for n0 in tl.range(start, end, PAGE_TOKENS, num_stages=STAGES):
        page = tl.load(block_table_ptr + batch * stride_bt_batch + n0 // PAGE_TOKENS)
        k = k_desc.load([page * PAGE_TOKENS, column])
        v = v_desc.load([page * PAGE_TOKENS, column])
        mask_n = n0 + tl.arange(0, PAGE_TOKENS) < end
        m_i, l_i, acc = da._attend_block(q, k, v, mask_n, m_i, l_i, acc, qk_scale_log2, DOT_PRECISION, False)
    da._store_split(out_ptr, lse_ptr, acc, m_i, l_i, batch, split, heads, mask_g, offs_d, stride_out_batch,
                    stride_out_head, stride_out_split, stride_lse_batch, stride_lse_head, stride_lse_split)


def page_rows_descriptor(pages: torch.Tensor):
    """One TMA descriptor over a ``[num_pages, page_tokens, heads, dim]`` pool seen as rows of tokens;
    a box is one page of one head (``[page_tokens, dim]``)."""
    num_pages, page_tokens, heads, dim = pages.shape
    return TensorDescriptor.from_tensor(pages.view(num_pages * page_tokens, heads * dim), [page_tokens, dim])


def contiguous_reader(flat: torch.Tensor, programs: int, block: int, warps: int) -> Callable[[], object]:
    chunk, grid = da.split_context(flat.numel(), programs, block)
    out = torch.empty(grid, dtype=torch.float32, device=flat.device)
    def call() -> torch.Tensor:
        _read_contiguous_kernel[(grid,)](flat, out, flat.numel(), chunk, BLOCK=block, num_warps=warps)
        return out

    return call


def split_geometry(context: int, programs: int, seq_heads: int, step: int) -> tuple[int, int]:
    """Tokens per split (a multiple of ``step``) and the split count for about ``programs`` programs."""
    return da.split_context(context, max(1, programs // seq_heads), step)


def paged_rows_reader(inputs, context: int, programs: int, block_n: int, warps: int, stages: int):
    q, k_pages, v_pages, block_table, seq_lens = inputs
    seq_heads = block_table.shape[0] * k_pages.shape[2]
    tokens, splits = split_geometry(context, programs, seq_heads, block_n)
    out = torch.empty(seq_heads * splits, dtype=torch.float32, device=q.device)
    strides = kv_pool_strides(k_pages, v_pages, block_table)
    def call() -> torch.Tensor:
        _read_paged_rows_kernel[(seq_heads, splits)](
            k_pages, v_pages, block_table, out, k_pages.shape[2], context, tokens, *strides.values(),
            HEAD_DIM=k_pages.shape[3], PAGE_TOKENS=k_pages.shape[1], BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        return out

    return call


def paged_rows_tma_reader(inputs, context: int, programs: int, warps: int, stages: int):
    q, k_pages, v_pages, block_table, seq_lens = inputs
    seq_heads = block_table.shape[0] * k_pages.shape[2]
    tokens, splits = split_geometry(context, programs, seq_heads, k_pages.shape[1])
    out = torch.empty(seq_heads * splits, dtype=torch.float32, device=q.device)
    k_desc, v_desc = page_rows_descriptor(k_pages), page_rows_descriptor(v_pages)
    def call() -> torch.Tensor:
        _read_paged_rows_tma_kernel[(seq_heads, splits)](
            k_desc, v_desc, block_table, out, k_pages.shape[2], context, tokens, block_table.stride(0),
            HEAD_DIM=k_pages.shape[3], PAGE_TOKENS=k_pages.shape[1], STAGES=stages, num_warps=warps)
        return out

    return call


def decode_tma_call(inputs, context: int, programs: int, warps: int, stages: int):
    """The decode split kernel with TMA page loads, then the shipped merge kernel."""
    q, k_pages, v_pages, block_table, seq_lens = inputs
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    group = num_heads // num_kv_heads
    tokens, splits = split_geometry(context, programs, batch * num_kv_heads, k_pages.shape[1])
    part_out = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    lse = torch.empty((batch, num_heads), dtype=torch.float32, device=q.device)
    k_desc, v_desc = page_rows_descriptor(k_pages), page_rows_descriptor(v_pages)
    _, precision = dot_options(q.dtype)

    def call() -> torch.Tensor:
        _decode_split_tma_kernel[(batch * num_kv_heads, splits)](
            q, k_desc, v_desc, block_table, seq_lens, part_out, part_lse, resolve_scale(None, head_dim) * da.LOG2E,
            num_kv_heads, tokens, q.stride(0), q.stride(1), block_table.stride(0), part_out.stride(0),
            part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            QUERY_GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), HEAD_DIM=head_dim,
            PAGE_TOKENS=k_pages.shape[1], STAGES=stages, DOT_PRECISION=precision, num_warps=warps)
        da.merge_splits(part_out, part_lse, out, lse)
        return out

    return call


def shipped_geometry(inputs, launch: da.DecodeLaunch | None = None, programs_per_sm: int | None = None):
    """The shipped launch (or ``launch``) and its tokens per split and split count, for one wave of
    ``programs_per_sm`` programs per SM (default: as many as the compiled kernel holds, as shipped)."""
    return da.decode_geometry(*inputs, launch=launch, resident_per_sm=programs_per_sm)


def shipped_split_only(inputs, launch: da.DecodeLaunch | None = None, programs_per_sm: int | None = None):
    """The shipped split kernel (shipped launch and split count unless given), without its merge."""
    q, k_pages, v_pages, block_table, seq_lens = inputs
    batch, num_heads, head_dim = q.shape
    launch, tokens, splits = shipped_geometry(inputs, launch, programs_per_sm)
    part_out, part_lse = da._split_buffers(batch, num_heads, splits, head_dim, q.device)
    args = da._split_kernel_args(q, k_pages, v_pages, block_table, seq_lens, part_out, part_lse,
                                 resolve_scale(None, head_dim), tokens, (part_out.stride(2), part_lse.stride(2)), launch)

    def call() -> torch.Tensor:
        da._decode_split_kernel[(batch * k_pages.shape[2], splits)](**args)
        return part_out

    return call


def shipped_with_launch(inputs, launch: da.DecodeLaunch, programs_per_sm: int):
    """The public call (split kernel and merge) with ``launch`` in place of the shipped one."""
    _, _, splits = shipped_geometry(inputs, launch, programs_per_sm)

    def call() -> torch.Tensor:
        shipped_config = da.decode_launch_config
        da.decode_launch_config = lambda *args: launch
        try:
            return da.paged_decode_attention(*inputs, num_splits=splits)
        finally:
            da.decode_launch_config = shipped_config

    return call


def decode_input_sets(model: str, batch: int, context: int, dtype: torch.dtype) -> tuple[int, list[tuple]]:
    """The KV bytes of a decode shape and enough copies of its inputs ``(q, k_pages, v_pages,
    block_table, seq_lens)``, every sequence full, that together they exceed twice the L2."""
    num_heads, num_kv_heads, head_dim = MODELS[model]
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def make():
        pools = make_paged_kv(batch, context, num_kv_heads, head_dim, PAGE_TOKENS, dtype)[:4]
        return torch.randn((batch, num_heads, head_dim), dtype=dtype, device=pools[0].device), *pools

    return kv_bytes, rotated(make, kv_bytes)


def best_b2b_us(calls: list[Callable[[], object]], repeats: int = 2) -> float:
    """Per-call GPU time of calls back to back in one graph (rotating among ``calls``), least of ``repeats``:
    ``do_bench`` of the graph, or with ``--timing sustained`` the graph replayed back to back for 0.1 s."""
    count = max(BACK_TO_BACK_CALLS, len(calls))
    if TIMING["mode"] == "sustained":
        return sustained_us(calls, count, seconds=0.1, repeats=repeats)
    return min(graph_us(calls, count) for _ in range(repeats))


def sweep(name: str, configs: list[dict], make: Callable[..., list[Callable[[], object]]], kv_bytes: int, copy_gbs: float,
          check: Callable[[Callable[[], object]], tuple[float, bool]]) -> list[dict]:
    """Time every config of one reader, after ``check`` of its first call gives its error and whether that
    is within tolerance; a config that fails to compile or run is recorded with its error."""
    rows = []
    for config in configs:
        row = {"variant": name, **config}
        try:
            calls = make(**config)
            row["err"], row["ok"] = check(calls[0])
            us = best_b2b_us(calls)
            row.update(b2b_us=round(us, 2), b2b_frac_of_copy=round(gb_per_s(kv_bytes, us / 1e3) / copy_gbs, 4))
        except Exception as exc:  # noqa: BLE001 - an experiment records what fails
            row["error"] = repr(exc)[:300]
        rows.append(row)
    return rows


def best(rows: list[dict]) -> dict | None:
    timed = [r for r in rows if "b2b_us" in r and r["ok"]]
    return min(timed, key=lambda r: r["b2b_us"]) if timed else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default="readers,split",
                        help="readers: the read-only kernels and the TMA decode; split: the shipped kernels' launch sweep")
    parser.add_argument("--readers", default=",".join(READERS), help="the readers part's kernels (default all)")
    parser.add_argument("--shapes", default=",".join(f"{m}:{b}:{c}" for m, b, c in SHAPES),
                        help="model:batch:context, comma-separated (default the three short shapes)")
    parser.add_argument("--timing", choices=("graph", "sustained"), default="graph",
                        help="graph: do_bench of each graph of calls (an L2 flush before each); sustained: the graph "
                             "replayed back to back for 0.1 s, against the copy timed alike")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    readers = set(args.readers.split(","))
    shapes = [(m, int(b), int(c)) for m, b, c in (item.split(":") for item in args.shapes.split(","))]
    TIMING["mode"] = args.timing
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_gbs = copy_bandwidth_sustained_gbs() if args.timing == "sustained" else copy_bandwidth_gbs()
    tiny = torch.zeros(1, device="cuda")
    how = ("each replayed back to back for 0.1 s, no L2 flush between (the copy issued back to back alike)"
           if args.timing == "sustained" else "each a do_bench median")
    report = {"benchmark": "decode_read_ceiling", "copy_bandwidth_gbs": copy_gbs, "sm_count": sms, "timing_mode": args.timing,
              "timing": "per call, calls back to back in one CUDA graph rotating among input copies that together exceed "
                        f"twice the L2 (cold bytes each call), least of two graph timings ({how})",
              "graph_one_element_kernel_b2b_us": best_b2b_us([lambda: tiny.add_(1)]), "shapes": []}
    dtype = torch.float16
    contiguous_cache: dict[int, list[dict]] = {}
    for model, batch, context in shapes:
        kv_bytes, sets = decode_input_sets(model, batch, context, dtype)
        expected = da.paged_decode_attention(*sets[0])
        shape = {"model": model, "batch": batch, "context": context, "kv_bytes": kv_bytes}
        flats = [torch.cat([s[1].flatten(), s[2].flatten()]) for s in sets]
        shape["torch_sum_b2b_us"] = round(best_b2b_us([functools.partial(f.sum, dtype=torch.float32) for f in flats]), 2)
        shipped = [functools.partial(da.paged_decode_attention, *s) for s in sets]
        shape["shipped_b2b_us"] = round(best_b2b_us(shipped), 2)
        shape["shipped_split_only_b2b_us"] = round(best_b2b_us([shipped_split_only(s) for s in sets]), 2)
        for key in ("torch_sum", "shipped", "shipped_split_only"):
            shape[f"{key}_b2b_frac_of_copy"] = round(gb_per_s(kv_bytes, shape[f"{key}_b2b_us"] / 1e3) / copy_gbs, 4)
        print(json.dumps(shape), flush=True)
        totals = [float(f.sum(dtype=torch.float64)) for f in flats]
        scale_of_sum = [float(f.abs().sum(dtype=torch.float64)) for f in flats]

        def check_read(call: Callable[[], torch.Tensor], index: int = 0) -> tuple[float, bool]:
            """A reader's partial sums add up to the sum of every KV byte (fp32 rounding allowed)."""
            err = abs(float(call().sum(dtype=torch.float64)) - totals[index])
            return err, err <= 1e-5 * scale_of_sum[index]

        def check_decode(call: Callable[[], torch.Tensor]) -> tuple[float, bool]:
            """A decode call against the shipped one (fp16 outputs of fp32 accumulations)."""
            err = float((call().float() - expected.float()).abs().max())
            return err, err <= 2e-3

        inputs = list(sets)
        rows: list[dict] = []
        if "split" in parts:
            rows += shipped_kernels_sweep(inputs, check_decode, kv_bytes, copy_gbs)
        if "readers" in parts:
            rows += readers_sweep(inputs, flats, context, check_read, check_decode, kv_bytes, copy_gbs, sms,
                                  contiguous_cache, readers)
        names = ("contiguous", "paged_rows", "paged_rows_tma", "decode_tma", "shipped_kernels_split_only",
                 "shipped_kernels_with_merge")
        shape["best"] = {name: best([r for r in rows if r["variant"] == name]) for name in names}
        shape["errors"] = [r for r in rows if "error" in r][:5]
        shape["rows"] = rows
        print(json.dumps({"shape": [model, batch, context], "best": shape["best"]}), flush=True)
        report["shapes"].append(shape)
        write_results(args.out, report)
        del sets, inputs, expected, shipped, flats
        torch.cuda.empty_cache()
    return 0


def readers_sweep(inputs, flats, context, check_read, check_decode, kv_bytes, copy_gbs, sms, contiguous_cache,
                  readers=READERS) -> list[dict]:
    """The read-only kernels and the TMA decode (those named in ``readers``), each over its launch parameters."""
    rows: list[dict] = []
    if "contiguous" in readers:
        if kv_bytes not in contiguous_cache:
            configs = [{"programs_per_sm": p, "block": b, "warps": w} for p in (1, 2, 4, 8) for b in (2048, 4096, 8192)
                       for w in (4, 8)]
            contiguous_cache[kv_bytes] = sweep(
                "contiguous", configs,
                lambda programs_per_sm, block, warps: [contiguous_reader(f, programs_per_sm * sms, block, warps) for f in flats],
                kv_bytes, copy_gbs, check_read)
        rows += contiguous_cache[kv_bytes]
    if "paged_rows" in readers:
        configs = [{"programs_per_sm": p, "block_n": n, "warps": w, "stages": st} for p in (2, 4, 8) for n in (32, 64, 128)
                   for w in (4, 8) for st in (1, 2, 3)]
        rows += sweep("paged_rows", configs,
                      lambda programs_per_sm, block_n, warps, stages: [
                          paged_rows_reader(s, context, programs_per_sm * sms, block_n, warps, stages) for s in inputs],
                      kv_bytes, copy_gbs, check_read)
    if "paged_rows_tma" in readers:
        configs = [{"programs_per_sm": p, "warps": w, "stages": st} for p in (2, 4, 8, 16) for w in (1, 2, 4)
                   for st in (2, 3, 4, 6)]
        rows += sweep("paged_rows_tma", configs,
                      lambda programs_per_sm, warps, stages: [
                          paged_rows_tma_reader(s, context, programs_per_sm * sms, warps, stages) for s in inputs],
                      kv_bytes, copy_gbs, check_read)
    if "decode_tma" in readers:
        configs = [{"programs_per_sm": p, "warps": w, "stages": st} for p in (2, 4, 8) for w in (4, 8) for st in (2, 3, 4, 6)]
        rows += sweep("decode_tma", configs,
                      lambda programs_per_sm, warps, stages: [
                          decode_tma_call(s, context, programs_per_sm * sms, warps, stages) for s in inputs],
                      kv_bytes, copy_gbs, check=check_decode)
    return rows


def shipped_kernels_sweep(inputs, check_decode, kv_bytes: int, copy_gbs: float) -> list[dict]:
    """The shipped split kernel and merge under other launch parameters: loop step, warps, stages, and
    the split count of one wave of 2-8 programs per SM; each config timed without and with the merge,
    after its full call is checked against the shipped one."""
    rows: list[dict] = []
    for block_n, warps, stages, per_sm in itertools.product((16, 32, 64), (4, 8), (1, 2, 3), (2, 3, 4, 5, 6, 8)):
        launch = da.DecodeLaunch(block_n, warps, stages, per_sm)
        config = {"block_n": block_n, "warps": warps, "stages": stages, "programs_per_sm": per_sm}
        try:
            full = [shipped_with_launch(s, launch, per_sm) for s in inputs]
            err, ok = check_decode(full[0])
            splits = shipped_geometry(inputs[0], launch, per_sm)[2]
            timed = {"shipped_kernels_split_only": [shipped_split_only(s, launch, per_sm) for s in inputs],
                     "shipped_kernels_with_merge": full}
            for name, calls in timed.items():
                us = best_b2b_us(calls)
                rows.append({"variant": name, **config, "splits": splits, "err": err, "ok": ok, "b2b_us": round(us, 2),
                             "b2b_frac_of_copy": round(gb_per_s(kv_bytes, us / 1e3) / copy_gbs, 4)})
        except Exception as exc:  # noqa: BLE001 - an experiment records what fails
            rows.append({"variant": "shipped_kernels_with_merge", **config, "error": repr(exc)[:300]})
    return rows


if __name__ == "__main__":
    sys.exit(main())
