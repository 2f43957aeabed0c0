"""Experiment behind a decode design decision: can the short decode shapes (33-268 MB of KV) lose
the fixed cost of the separate split-merge kernel? Not a product benchmark; its kernels are
throwaway variants of ``_decode_split_kernel``.

Variants, each timed as in ``bench_paged_attention.py`` (one CUDA graph per call after an L2 flush,
and 8+ calls back to back on cold inputs), checked against the shipped call:

* ``current``: the shipped two-kernel call (split kernel, then merge kernel).
* ``fused_memset`` / ``fused_persistent``: the last split program of each (sequence, KV head) to
  finish, found with an acq_rel atomic counter, merges the group's splits itself (one kernel); the
  counters zeroed per call (a memset) or kept zero across calls (the merging program resets them).
  ``fused_one_pass_persistent``: the same merge in one pass when there are at most 64 splits.
* ``split_only_no_merge``: the split kernel alone (no merge, wrong result): the floor any merge
  scheme can reach. ``host_bounds_*``: the loop bound from the host (no wait on ``seq_lens``).
* ``pdl_merge`` / ``pdl_merge_trigger_early``: the merge kernel launched with programmatic
  dependent launch, the split kernel triggering it at exit or at its start.

Also the fixed cost of a graph of one tiny kernel, of one memset, and of two tiny kernels.

Run: ``python benchmarks/decode_merge_variants.py --out FILE`` (CUDA only).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_paged_attention import MODELS, graph_us, make_paged_kv, rotated, copy_bandwidth_gbs, gb_per_s  # noqa
from pagedtensor.triton_kernels import decode_attention as da
from pagedtensor.triton_kernels._common import dot_options, kv_pool_strides, next_power_of_2, resolve_scale

try:
    from triton.language.extra.cuda import gdc_wait, gdc_launch_dependents
    HAVE_GDC = True
except Exception as exc:  # noqa
    print("no gdc", exc)
    HAVE_GDC = False


@triton.jit
def _fused_kernel(
    q_ptr, k_pages_ptr, v_pages_ptr, block_table_ptr, seq_lens_ptr, out_ptr, lse_ptr, final_out_ptr, final_lse_ptr,
    counter_ptr, qk_scale_log2, num_kv_heads, tokens_per_split,
    stride_q_batch: tl.int64, stride_q_head: tl.int64,
    stride_k_page: tl.int64, stride_k_token: tl.int64, stride_k_head: tl.int64,
    stride_v_page: tl.int64, stride_v_token: tl.int64, stride_v_head: tl.int64, stride_bt_batch: tl.int64,
    stride_out_batch: tl.int64, stride_out_head: tl.int64, stride_out_split: tl.int64,
    stride_lse_batch: tl.int64, stride_lse_head: tl.int64, stride_lse_split: tl.int64,
    stride_fo_batch: tl.int64, stride_fo_head: tl.int64, stride_fl_batch: tl.int64, stride_fl_head: tl.int64,
    QUERY_GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK_SPLITS: tl.constexpr, FUSED: tl.constexpr, TRIGGER_EARLY: tl.constexpr,
    ONE_PASS: tl.constexpr, HOST_BOUNDS: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, max_len,
):
    if TRIGGER_EARLY:
        gdc_launch_dependents()
    pid_seq_head = tl.program_id(0)
    num_splits = tl.num_programs(1)
    batch, kv_head, split, start, end, heads, mask_g, offs_d, q = da._split_program(
        q_ptr, seq_lens_ptr, num_kv_heads, tokens_per_split, stride_q_batch, stride_q_head, QUERY_GROUP, BLOCK_G, HEAD_DIM)
    m_i, l_i, acc = da._empty_state(BLOCK_G, HEAD_DIM)
    block_table_row_ptr = block_table_ptr + batch * stride_bt_batch
    k_head_ptr = k_pages_ptr + kv_head * stride_k_head
    v_head_ptr = v_pages_ptr + kv_head * stride_v_head
    loop_end = end
    if HOST_BOUNDS:
        loop_end = tl.minimum(start + tokens_per_split, max_len)
    for n0 in range(start, loop_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(block_table_row_ptr + offs_n // PAGE_TOKENS, mask=offs_n < loop_end, other=0)
        k, v = da._load_kv_block(k_head_ptr, v_head_ptr, page, offs_n, mask_n, offs_d, stride_k_page, stride_k_token,
                                 stride_v_page, stride_v_token, PAGE_TOKENS, DOT_UPCAST)
        m_i, l_i, acc = da._attend_block(q, k, v, mask_n, m_i, l_i, acc, qk_scale_log2, DOT_PRECISION, HOST_BOUNDS)
    da._store_split(out_ptr, lse_ptr, acc, m_i, l_i, batch, split, heads, mask_g, offs_d, stride_out_batch, stride_out_head,
                    stride_out_split, stride_lse_batch, stride_lse_head, stride_lse_split)
    out_row_ptr = out_ptr + batch * stride_out_batch
    lse_row_ptr = lse_ptr + batch * stride_lse_batch
    if FUSED:
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_seq_head, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            tl.store(counter_ptr + pid_seq_head, 0)
            for g in tl.static_range(QUERY_GROUP):
                head = kv_head * QUERY_GROUP + g
                lse_head_ptr = lse_row_ptr + head * stride_lse_head
                out_head_ptr = out_row_ptr + head * stride_out_head
                if ONE_PASS:
                    offs_c = tl.arange(0, CHUNK_SPLITS)
                    mask_c = offs_c < num_splits
                    lse_c = tl.load(lse_head_ptr + offs_c * stride_lse_split, mask=mask_c, other=float("-inf"), cache_modifier=".cg")
                    part = tl.load(out_head_ptr + offs_c[:, None] * stride_out_split + offs_d[None, :], mask=mask_c[:, None], other=0.0, cache_modifier=".cg")
                    m = tl.max(lse_c, 0)
                    m_safe = tl.where(m == float("-inf"), 0.0, m)
                    w = tl.exp(lse_c - m_safe)
                    denom = tl.sum(w, 0)
                    total = tl.sum(w[:, None] * part, axis=0)
                else:
                    m = float("-inf")
                    for s0 in range(0, num_splits, CHUNK_SPLITS):
                        offs_c = s0 + tl.arange(0, CHUNK_SPLITS)
                        m = tl.maximum(m, tl.max(tl.load(lse_head_ptr + offs_c * stride_lse_split, mask=offs_c < num_splits, other=float("-inf"), cache_modifier=".cg"), 0))
                    m_safe = tl.where(m == float("-inf"), 0.0, m)
                    denom = 0.0
                    total = tl.zeros([HEAD_DIM], tl.float32)
                    for s0 in range(0, num_splits, CHUNK_SPLITS):
                        offs_c = s0 + tl.arange(0, CHUNK_SPLITS)
                        mask_c = offs_c < num_splits
                        w = tl.exp(tl.load(lse_head_ptr + offs_c * stride_lse_split, mask=mask_c, other=float("-inf"), cache_modifier=".cg") - m_safe)
                        part = tl.load(out_head_ptr + offs_c[:, None] * stride_out_split + offs_d[None, :], mask=mask_c[:, None], other=0.0, cache_modifier=".cg")
                        denom += tl.sum(w, 0)
                        total += tl.sum(w[:, None] * part, axis=0)
                ok = denom > 0.0
                res = total / tl.where(ok, denom, 1.0)
                tl.store(final_out_ptr + batch * stride_fo_batch + head * stride_fo_head + offs_d, res.to(final_out_ptr.dtype.element_ty))
                tl.store(final_lse_ptr + batch * stride_fl_batch + head * stride_fl_head, tl.where(ok, m_safe + tl.log(tl.where(ok, denom, 1.0)), float("-inf")))


@triton.jit
def _merge_pdl_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_heads, num_splits,
                      stride_po_batch: tl.int64, stride_po_head: tl.int64, stride_po_split: tl.int64,
                      stride_pl_batch: tl.int64, stride_pl_head: tl.int64, stride_out_batch: tl.int64,
                      stride_out_head: tl.int64, stride_lse_batch: tl.int64, stride_lse_head: tl.int64,
                      HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr, CHUNK_SPLITS: tl.constexpr):
    gdc_wait()
    pid = tl.program_id(0)
    batch = (pid // num_heads).to(tl.int64)
    head = (pid % num_heads).to(tl.int64)
    part_lse_row_ptr = part_lse_ptr + batch * stride_pl_batch + head * stride_pl_head
    part_out_row_ptr = part_out_ptr + batch * stride_po_batch + head * stride_po_head
    offs_s = tl.arange(0, BLOCK_SPLITS)
    lse_all = tl.load(part_lse_row_ptr + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_all, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp(lse_all - m_safe), axis=0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, num_splits, CHUNK_SPLITS):
        offs_c = s0 + tl.arange(0, CHUNK_SPLITS)
        mask_c = offs_c < num_splits
        w = tl.exp(tl.load(part_lse_row_ptr + offs_c, mask=mask_c, other=float("-inf")) - m_safe)
        part = tl.load(part_out_row_ptr + offs_c[:, None] * stride_po_split + offs_d[None, :], mask=mask_c[:, None], other=0.0)
        acc += tl.sum(w[:, None] * part, axis=0)
    has_keys = denom > 0.0
    out = acc / tl.where(has_keys, denom, 1.0)
    lse = tl.where(has_keys, m_safe + tl.log(tl.where(has_keys, denom, 1.0)), float("-inf"))
    tl.store(out_ptr + batch * stride_out_batch + head * stride_out_head + offs_d, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + batch * stride_lse_batch + head * stride_lse_head, lse)


def fused_call(q, k_pages, v_pages, block_table, seq_lens, counters=None, fused=True, trigger_early=False, merge=False, one_pass=False, host_bounds=False, pdl=True):
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    launch, tps, num_splits = da.decode_geometry(q, k_pages, v_pages, block_table, seq_lens)
    part_out, part_lse = da._split_buffers(batch, num_heads, num_splits, head_dim, q.device)
    out = torch.empty_like(q)
    lse = torch.empty((batch, num_heads), dtype=torch.float32, device=q.device)
    if counters is None and fused:
        counters = torch.zeros(batch * num_kv_heads, dtype=torch.int32, device=q.device)
    group = num_heads // num_kv_heads
    upcast, precision = dot_options(q.dtype)
    _fused_kernel[(batch * num_kv_heads, num_splits)](
        q, k_pages, v_pages, block_table, seq_lens, part_out, part_lse, out, lse, counters,
        resolve_scale(None, head_dim) * da.LOG2E, num_kv_heads, tps, q.stride(0), q.stride(1),
        *kv_pool_strides(k_pages, v_pages, block_table).values(),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        QUERY_GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), HEAD_DIM=head_dim, PAGE_TOKENS=k_pages.shape[1],
        BLOCK_N=launch.block_n, CHUNK_SPLITS=min(64, next_power_of_2(num_splits)), num_warps=launch.num_warps, num_stages=launch.num_stages, FUSED=fused, TRIGGER_EARLY=trigger_early,
        ONE_PASS=one_pass and num_splits <= 64, HOST_BOUNDS=host_bounds, DOT_UPCAST=upcast, DOT_PRECISION=precision,
        max_len=block_table.shape[1] * k_pages.shape[1])
    if merge:
        launch_merge(part_out, part_lse, out, lse, num_splits, pdl)
    return out


def launch_merge(part_out, part_lse, out, lse, num_splits, pdl):
    """The merge kernel over ``num_splits`` partials, launched with programmatic dependent launch
    when ``pdl`` (its ``gdc_wait`` is a no-op otherwise)."""
    batch, num_heads, head_dim = out.shape
    bs = next_power_of_2(num_splits)
    _merge_pdl_kernel[(batch * num_heads,)](part_out, part_lse, out, lse, num_heads, num_splits, part_out.stride(0), part_out.stride(1),
                                            part_out.stride(2), part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
                                            lse.stride(0), lse.stride(1), HEAD_DIM=head_dim, BLOCK_SPLITS=bs, CHUNK_SPLITS=min(bs, 64),
                                            num_warps=8 if min(bs, 64) * head_dim >= 8192 else 4, launch_pdl=pdl)


def pdl_call(q, k_pages, v_pages, block_table, seq_lens):
    batch, num_heads, head_dim = q.shape
    launch, tps, num_splits = da.decode_geometry(q, k_pages, v_pages, block_table, seq_lens)
    part_out, part_lse = da._split_buffers(batch, num_heads, num_splits, head_dim, q.device)
    da._decode_split_kernel[(batch * k_pages.shape[2], num_splits)](
        **da._split_kernel_args(q, k_pages, v_pages, block_table, seq_lens, part_out, part_lse, resolve_scale(None, head_dim), tps,
                                (part_out.stride(2), part_lse.stride(2)), launch))
    out = torch.empty_like(q)
    lse = torch.empty((batch, num_heads), dtype=torch.float32, device=q.device)
    launch_merge(part_out, part_lse, out, lse, num_splits, pdl=True)
    return out


SHAPES = [("llama2-7b", 1, 8192), ("llama3-8b", 1, 8192), ("llama3-8b", 1, 32768), ("llama3-8b", 1, 65536), ("llama3-8b", 8, 8192),
          ("llama2-7b", 1, 32768), ("llama2-7b", 8, 32768)]


def main():
    from benchmarks.common import write_results
    out_path = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    tiny = torch.zeros(1, device="cuda")
    report = {"benchmark": "decode_merge_variants", "copy_bandwidth_gbs": copy_gbs, "rows": []}
    report["fixed"] = ({"copy_gbs": copy_gbs, "graph_one_kernel_us": graph_us([lambda: tiny.add_(1)]),
                      "graph_memset_us": graph_us([lambda: torch.zeros(8, dtype=torch.int32, device="cuda")]),
                      "graph_two_kernels_us": graph_us([lambda: (tiny.add_(1), tiny.add_(1))])})
    print(json.dumps(report["fixed"]), flush=True)
    dtype = torch.float16
    for model, batch, context in SHAPES:
        num_heads, num_kv_heads, head_dim = MODELS[model]
        kv_bytes = 2 * batch * context * num_kv_heads * head_dim * 2

        def make():
            pools = make_paged_kv(batch, context, num_kv_heads, head_dim, 16, dtype)[:4]
            return torch.randn((batch, num_heads, head_dim), dtype=dtype, device="cuda"), *pools

        sets = rotated(make, kv_bytes)
        calls = max(8, len(sets))
        expected = da.paged_decode_attention(*sets[0])
        persistent = [torch.zeros(batch * num_kv_heads, dtype=torch.int32, device="cuda") for _ in sets]
        variants = {
            "current": [functools.partial(da.paged_decode_attention, *s) for s in sets],
            "fused_memset": [functools.partial(fused_call, *s) for s in sets],
            "fused_persistent": [functools.partial(fused_call, *s, counters=c) for s, c in zip(sets, persistent)],
            "fused_one_pass_persistent": [functools.partial(fused_call, *s, counters=c, one_pass=True) for s, c in zip(sets, persistent)],
            "split_only_no_merge": [functools.partial(fused_call, *s, fused=False) for s in sets],
            "host_bounds_split_only": [functools.partial(fused_call, *s, fused=False, host_bounds=True) for s in sets],
            "host_bounds_merge": [functools.partial(fused_call, *s, fused=False, host_bounds=True, merge=True, pdl=False) for s in sets],
            "pdl_merge_trigger_early": [functools.partial(fused_call, *s, fused=False, trigger_early=True, merge=True) for s in sets],
        }
        if HAVE_GDC:
            variants["pdl_merge"] = [functools.partial(pdl_call, *s) for s in sets]
        row = {"model": model, "batch": batch, "context": context, "kv_bytes": kv_bytes}
        for name, fns in variants.items():
            try:
                for _ in range(3):
                    got = fns[0]()
                torch.cuda.synchronize()
                err = None if name.endswith("split_only") or name == "split_only_no_merge" else (got.float() - expected.float()).abs().max().item()
                one = graph_us(fns[:1])
                b2b = graph_us(fns, calls)
                b2b2 = graph_us(fns, calls)
                row[name] = {"err": err, "flush_us": round(one, 2), "b2b_us": round(min(b2b, b2b2), 2),
                             "b2b_frac": round(gb_per_s(kv_bytes, min(b2b, b2b2) / 1e3) / copy_gbs, 3),
                             "flush_frac": round(gb_per_s(kv_bytes, one / 1e3) / copy_gbs, 3)}
            except Exception as exc:  # noqa
                row[name] = {"error": repr(exc)[:300]}
        # counters must be zero again after every call
        row["persistent_counters_zero"] = all(int(c.abs().sum()) == 0 for c in persistent)
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
        if out_path:
            write_results(out_path, report)
        del sets, variants, persistent
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
