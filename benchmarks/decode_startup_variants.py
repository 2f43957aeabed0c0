"""Experiment behind a decode design decision: what does the split kernel's start-up chain cost?
Not a product benchmark; its kernel is a throwaway variant of ``_decode_split_kernel``.

Each program of the split kernel as it was until 578dae7 waited on three dependent memory round trips
before its first K/V bytes were in flight: ``seq_lens`` (its loop bound and masks), then the block-table
entries of its first step (masked by that bound), then the K/V rows. (The kernel here with every flag
off is that loop; ``carry_table`` below is what 578dae7 shipped, so since then ``shipped`` and
``carry_table`` are the same loop.) On the 128 MiB decode shapes a program runs
only about 8 loop steps, so this chain is a visible part of the call. Variants, each with the shipped
launch and split count, timed split kernel alone and followed by the shipped merge (calls back to back
in one CUDA graph on cold inputs, as ``decode_read_ceiling.py`` times them), checked against the
shipped call:

* ``shipped``: the shipped split kernel.
* ``host_bounds``: the loop bound from the host (``min(split end, max_pages * page_tokens)``), the
  block table read up to that bound and the K/V rows masked by ``seq_lens``, so the block-table and
  ``seq_lens`` loads are in flight together; the block step takes a block with no visible key
  (``MAY_BE_EMPTY``). (It walks every split to the host bound: fine here, where every sequence is
  full, but a ragged batch would pay masked steps.)
* ``prefetch_table``: the loop of before 578dae7, after an L2 prefetch (``prefetch.global.L2``) of the split's
  block-table entries issued before ``seq_lens`` returns, so the table load after it hits L2.
* ``carry_table``: the shipped loop bound, with each step's block-table entries loaded one step
  ahead and carried, the first step's before the loop (bounded by the host's split end, not
  ``seq_lens``), so the first table load is in flight beside ``seq_lens``; a ragged batch pays nothing.
* ``fill_wave``: the shipped kernel with as many splits as fill every resident slot (tokens per split
  not rounded to whole loop steps: 66 splits of 497 tokens instead of 64 of 512 for 8 KV heads over
  32K), merged in one round trip of up to 128 splits.
* ``merge_block_d_<N>``: the shipped call with each merge program over N dimensions of a head
  (shipped: ``MERGE_BLOCK_D``). Until 4f23dbd the merge sized its slices by the partial elements a
  program loads (``MERGE_PARTIAL_ELEMENTS``, 2048), and ``merge_elements_<N>`` varied that
  (results/decode_merge_elements_h200.json).
* ``kv_evict_first``, ``kv_evict_last`` (64540ae-5b0d927, results/decode_kv_eviction_h200.json): the
  shipped loop with an L2 eviction hint on the K/V rows; no change on the H200, so the hint
  parameters left the shipped helper. (The rows already skip L1: Triton loads them with
  ``cp.async.cg``.)
* ``maxnreg_<N>``: the shipped loop compiled with at most N registers a thread, so more programs fit
  on an SM, with the split count of one wave of that many.

Run: ``python3 benchmarks/decode_startup_variants.py --out PATH [--variants a,b]`` on a CUDA machine (about a
minute).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable

import torch
import triton
import triton.language as tl

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_paged_attention import copy_bandwidth_gbs, gb_per_s  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from benchmarks.decode_read_ceiling import SHAPES, best_b2b_us, decode_input_sets, shipped_split_only  # noqa: E402

from pagedtensor.triton_kernels import decode_attention as da  # noqa: E402
from pagedtensor.triton_kernels._common import programs_per_sm, resolve_scale  # noqa: E402

PREFETCH_LINES = 4  # 128-byte lines of block-table entries prefetched per program (128 pages)


@triton.jit
def _prefetch_l2(ptrs):
    """``prefetch.global.L2`` of every address in ``ptrs`` (no value; impure so it is kept)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _decode_split_startup_kernel(
    q_ptr, k_pages_ptr, v_pages_ptr, block_table_ptr, seq_lens_ptr, out_ptr, lse_ptr, qk_scale_log2, num_kv_heads,
    tokens_per_split, stride_q_batch: tl.int64, stride_q_head: tl.int64, stride_k_page: tl.int64,
    stride_k_token: tl.int64, stride_k_head: tl.int64, stride_v_page: tl.int64, stride_v_token: tl.int64,
    stride_v_head: tl.int64, stride_bt_batch: tl.int64, stride_out_batch: tl.int64, stride_out_head: tl.int64,
    stride_out_split: tl.int64, stride_lse_batch: tl.int64, stride_lse_head: tl.int64, stride_lse_split: tl.int64,
    QUERY_GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, max_pages,
    HOST_BOUNDS: tl.constexpr, PREFETCH_TABLE: tl.constexpr, PREFETCH_LINES: tl.constexpr,
    CARRY_TABLE: tl.constexpr,
):
    if PREFETCH_TABLE:  # before the seq_lens load below, so the two are in flight together
        first_entry = tl.program_id(1) * (tokens_per_split // PAGE_TOKENS)
        entries = tl.minimum(first_entry + tl.arange(0, PREFETCH_LINES) * 32, max_pages - 1)
        _prefetch_l2(block_table_ptr + (tl.program_id(0) // num_kv_heads).to(tl.int64) * stride_bt_batch + entries)
    batch, kv_head, split, start, end, heads, mask_g, offs_d, q = da._split_program(
        q_ptr, seq_lens_ptr, num_kv_heads, tokens_per_split, stride_q_batch, stride_q_head, QUERY_GROUP, BLOCK_G, HEAD_DIM
    )
    if DOT_UPCAST:
        q = q.to(tl.float32)
    m_i, l_i, acc = da._empty_state(BLOCK_G, HEAD_DIM)
    block_table_row_ptr = block_table_ptr + batch * stride_bt_batch
    k_head_ptr = k_pages_ptr + kv_head * stride_k_head
    v_head_ptr = v_pages_ptr + kv_head * stride_v_head
    table_end = tl.minimum(start + tokens_per_split, max_pages * PAGE_TOKENS)  # the split's entries, from the host
    loop_end = table_end if HOST_BOUNDS else end
    if CARRY_TABLE:  # the first step's entries, not waiting on seq_lens
        offs_next = start + tl.arange(0, BLOCK_N)
        page_next = tl.load(block_table_row_ptr + offs_next // PAGE_TOKENS, mask=offs_next < table_end, other=0)
    for n0 in range(start, loop_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        if CARRY_TABLE:  # this step's entries were loaded a step ahead; load the next step's
            page = page_next
            offs_next = offs_n + BLOCK_N
            page_next = tl.load(block_table_row_ptr + offs_next // PAGE_TOKENS, mask=offs_next < table_end, other=0)
        else:
            page = tl.load(block_table_row_ptr + offs_n // PAGE_TOKENS, mask=offs_n < loop_end, other=0)
        k, v = da._load_kv_block(k_head_ptr, v_head_ptr, page, offs_n, mask_n, offs_d, stride_k_page, stride_k_token,
                                 stride_v_page, stride_v_token, PAGE_TOKENS, DOT_UPCAST)  # fmt: skip
        m_i, l_i, acc = da._attend_block(q, k, v, mask_n, m_i, l_i, acc, qk_scale_log2, DOT_PRECISION, HOST_BOUNDS)
    da._store_split(out_ptr, lse_ptr, acc, m_i, l_i, batch, split, heads, mask_g, offs_d, stride_out_batch,
                    stride_out_head, stride_out_split, stride_lse_batch, stride_lse_head, stride_lse_split)


def startup_variant(inputs, host_bounds: bool, prefetch_table: bool, merge: bool, carry_table: bool = False,
                    maxnreg: int | None = None) -> Callable[[], torch.Tensor]:
    """The variant kernel at the shipped launch and split count (with ``maxnreg``, the split count of
    one wave of the programs an SM then holds), with the shipped merge when ``merge`` (returns the
    output) or alone (returns the partials)."""
    q, k_pages, v_pages, block_table, seq_lens = inputs
    batch, num_heads, head_dim = q.shape
    launch, tokens, splits = da.decode_geometry(*inputs)
    part_out, part_lse = da._split_buffers(batch, num_heads, splits, head_dim, q.device)
    args = da._split_kernel_args(q, k_pages, v_pages, block_table, seq_lens, part_out, part_lse,
                                 resolve_scale(None, head_dim), tokens, (part_out.stride(2), part_lse.stride(2)), launch)
    flags = dict(max_pages=block_table.shape[1], HOST_BOUNDS=host_bounds, PREFETCH_TABLE=prefetch_table,
                 PREFETCH_LINES=PREFETCH_LINES, CARRY_TABLE=carry_table, **({"maxnreg": maxnreg} if maxnreg else {}))
    args.update(flags)
    resident = da.resident_programs_per_sm(q, k_pages, v_pages, block_table, seq_lens, launch)
    if maxnreg:  # the split count of one wave of the programs an SM holds under the cap
        resident = programs_per_sm(_decode_split_startup_kernel.warmup(grid=(1, 1), **args), q.device)
        launch, tokens, splits = da.decode_geometry(*inputs, resident_per_sm=resident)
        part_out, part_lse = da._split_buffers(batch, num_heads, splits, head_dim, q.device)
        args = da._split_kernel_args(q, k_pages, v_pages, block_table, seq_lens, part_out, part_lse,
                                     resolve_scale(None, head_dim), tokens, (part_out.stride(2), part_lse.stride(2)),
                                     launch)  # fmt: skip
        args.update(flags)
    out = torch.empty_like(q)
    lse = torch.empty((batch, num_heads), dtype=torch.float32, device=q.device)

    def call() -> torch.Tensor:
        _decode_split_startup_kernel[(batch * k_pages.shape[2], splits)](**args)
        if not merge:
            return part_out
        da.merge_splits(part_out, part_lse, out, lse)
        return out

    call.splits, call.resident = splits, resident  # recorded in the results
    return call


def fill_wave_call(inputs, merge: bool) -> Callable[[], torch.Tensor]:
    """The shipped split kernel with the split count that fills every resident slot (tokens per split
    not rounded to whole loop steps), then, when ``merge``, the shipped merge with up to 128 splits in
    one round trip."""
    q, k_pages, v_pages, block_table, seq_lens = inputs
    batch, num_heads, head_dim = q.shape
    launch = da.decode_launch_config(num_heads // k_pages.shape[2], head_dim, q.dtype, q.device)
    resident = da.resident_programs_per_sm(q, k_pages, v_pages, block_table, seq_lens, launch)
    max_len = block_table.shape[1] * k_pages.shape[1]
    tokens = triton.cdiv(max_len, da.sm_count(q.device) * resident // (batch * k_pages.shape[2]))
    splits = triton.cdiv(max_len, tokens)
    part_out, part_lse = da._split_buffers(batch, num_heads, splits, head_dim, q.device)
    args = da._split_kernel_args(q, k_pages, v_pages, block_table, seq_lens, part_out, part_lse,
                                 resolve_scale(None, head_dim), tokens, (part_out.stride(2), part_lse.stride(2)), launch)
    out = torch.empty_like(q)
    lse = torch.empty((batch, num_heads), dtype=torch.float32, device=q.device)

    def call() -> torch.Tensor:
        da._decode_split_kernel[(batch * k_pages.shape[2], splits)](**args)
        if not merge:
            return part_out
        shipped_chunk, da.MERGE_CHUNK_SPLITS = da.MERGE_CHUNK_SPLITS, 128
        try:
            da.merge_splits(part_out, part_lse, out, lse)
        finally:
            da.MERGE_CHUNK_SPLITS = shipped_chunk
        return out

    call.splits, call.resident = splits, resident  # recorded in the results
    return call


def merge_block_d_call(inputs, merge: bool, block_d: int) -> Callable[[], torch.Tensor]:
    """The shipped call with ``MERGE_BLOCK_D`` set to ``block_d`` (the split kernel alone when not
    ``merge``: the shipped one)."""
    if not merge:
        return shipped_split_only(inputs)

    def call() -> torch.Tensor:
        shipped_block_d, da.MERGE_BLOCK_D = da.MERGE_BLOCK_D, block_d
        try:
            return da.paged_decode_attention(*inputs)
        finally:
            da.MERGE_BLOCK_D = shipped_block_d

    launch, _, call.splits = da.decode_geometry(*inputs)
    call.resident = da.resident_programs_per_sm(*inputs, launch)
    return call


VARIANTS = {"host_bounds": dict(host_bounds=True, prefetch_table=False),
            "prefetch_table": dict(host_bounds=False, prefetch_table=True),
            "host_bounds_prefetch_table": dict(host_bounds=True, prefetch_table=True),
            "carry_table": dict(host_bounds=False, prefetch_table=False, carry_table=True),
            **{f"maxnreg_{n}": dict(host_bounds=False, prefetch_table=False, maxnreg=n) for n in (80, 96)},
            "fill_wave": fill_wave_call,
            **{f"merge_block_d_{n}": functools.partial(merge_block_d_call, block_d=n) for n in (32, 64, 128)}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds of every variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    report = {"benchmark": "decode_startup_variants", "copy_bandwidth_gbs": copy_gbs,
              "timing": "per call, calls back to back in one CUDA graph rotating among input copies that together exceed "
                        "twice the L2 (cold bytes each call), least of two graph timings (each a do_bench median); "
                        "every variant timed once per round, rounds interleaved",
              "shapes": []}  # fmt: skip
    dtype = torch.float16
    for model, batch, context in SHAPES:
        kv_bytes, sets = decode_input_sets(model, batch, context, dtype)
        expected = da.paged_decode_attention(*sets[0])
        shape = {"model": model, "batch": batch, "context": context, "kv_bytes": kv_bytes,
                 "splits": da.decode_geometry(*sets[0])[2], "variants": {}}  # fmt: skip
        timed: dict[str, list[Callable[[], object]]] = {
            "shipped_split_only": [shipped_split_only(s) for s in sets],
            "shipped": [functools.partial(da.paged_decode_attention, *s) for s in sets],
        }
        for name in args.variants.split(","):
            flags = VARIANTS[name]
            make_call = flags if callable(flags) else functools.partial(startup_variant, **flags)
            full = [make_call(s, merge=True) for s in sets]
            err = float((full[0]().float() - expected.float()).abs().max())
            shape["variants"][name] = {"max_abs_err_vs_shipped": err, "ok": err <= 2e-3, "splits": full[0].splits,
                                       "programs_per_sm": full[0].resident}
            timed[f"{name}_split_only"] = [make_call(s, merge=False) for s in sets]
            timed[name] = full
        samples: dict[str, list[float]] = {name: [] for name in timed}
        for _ in range(args.rounds):
            for name, calls in timed.items():
                samples[name].append(round(best_b2b_us(calls), 2))
        shape["b2b_us"] = samples
        shape["b2b_frac_of_copy"] = {name: [round(gb_per_s(kv_bytes, us / 1e3) / copy_gbs, 4) for us in values]
                                     for name, values in samples.items()}  # fmt: skip
        print(json.dumps(shape), flush=True)
        report["shapes"].append(shape)
        write_results(args.out, report)
        del sets, timed, expected
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
