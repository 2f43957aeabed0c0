"""Exact merge of attention partials computed over disjoint key sets.

A partial is ``(out, lse)``: the softmax-weighted value average over its keys and the natural-log
sum of ``exp(score)`` over them, as returned by the paged attention kernels with ``return_lse=True``.
For disjoint key sets ``K_1 .. K_n`` the attention over their union is

    lse = log(sum_i exp(lse_i)),   out = sum_i exp(lse_i - lse) * out_i

which is what this module computes (in fp32, max-shifted). A partial over no keys has
``lse = -inf`` and weight 0; if every partial is empty the result is zeros with ``lse = -inf``. A NaN
(or ``+inf``) lse makes the result NaN: a partial over corrupt keys is never taken for an empty one.

Plain torch ops: they run on any device and trace under ``torch.compile`` as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def merge_attention_partials(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention outputs over disjoint key sets into the output over their union.

    Args:
        outs: partial outputs, each ``[..., head_dim]`` of one shape and dtype (e.g. decode
            ``[batch, num_heads, head_dim]``, prefill ``[batch, q_len, num_heads, head_dim]``).
        lses: their fp32 log-sum-exps, each ``outs[i].shape[:-1]``.

    Returns:
        ``(out, lse)``: ``out`` in the dtype of ``outs``, ``lse`` fp32; merge them further the same way.
    """
    if isinstance(outs, torch.Tensor) or isinstance(lses, torch.Tensor):
        raise TypeError("outs and lses must be sequences of tensors (e.g. lists), not a single tensor")
    for name, value in (("outs", outs), ("lses", lses)):
        if not isinstance(value, Iterable):
            raise TypeError(f"{name} must be a sequence of tensors (e.g. a list), got {type(value).__name__}")
    outs, lses = list(outs), list(lses)
    if not outs:
        raise ValueError("outs must hold at least one partial, got 0")
    if len(outs) != len(lses):
        raise ValueError(f"outs has {len(outs)} partials but lses has {len(lses)}")
    for i, (out, lse) in enumerate(zip(outs, lses)):
        if not isinstance(out, torch.Tensor) or not isinstance(lse, torch.Tensor):
            raise TypeError(f"outs[{i}] and lses[{i}] must be tensors, got {type(out).__name__}, {type(lse).__name__}")
        if out.dim() < 1:
            raise ValueError(f"outs[{i}] must be [..., head_dim], at least 1 dimension, got shape {tuple(out.shape)}")
        for name, tensor in ((f"outs[{i}]", out), (f"lses[{i}]", lse)):
            if tensor.device != outs[0].device:
                raise ValueError(f"{name} is on {tensor.device}, expected {outs[0].device} (the device of outs[0])")
        if out.shape != outs[0].shape or out.dtype != outs[0].dtype:
            raise ValueError(
                f"outs[{i}] is {tuple(out.shape)} {out.dtype}, expected {tuple(outs[0].shape)} {outs[0].dtype}"
            )
        if tuple(lse.shape) != tuple(out.shape[:-1]):
            raise ValueError(f"lses[{i}] shape {tuple(lse.shape)} must be outs[{i}].shape[:-1] = {tuple(out.shape[:-1])}")
        if not out.dtype.is_floating_point:
            raise TypeError(f"outs[{i}] must be a floating tensor, got {out.dtype}")
        if not lse.dtype.is_floating_point:
            raise TypeError(f"lses[{i}] must be a floating tensor, got {lse.dtype}")

    lse_stack = torch.stack([lse.float() for lse in lses])
    lse_max = lse_stack.amax(dim=0)
    shift = torch.where(torch.isneginf(lse_max), torch.zeros_like(lse_max), lse_max)
    weights = torch.exp(lse_stack - shift)  # an empty partial (-inf) weighs exactly 0
    denom = weights.sum(dim=0)
    has_keys = denom != 0  # NaN (from a NaN or +inf lse) propagates rather than reading as "no keys"
    acc = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for weight, out in zip(weights, outs):
        # where(): an empty partial may carry any value (even NaN) without touching the result
        acc = acc + torch.where(weight.unsqueeze(-1) != 0, weight.unsqueeze(-1) * out.float(), 0.0)
    safe_denom = torch.where(has_keys, denom, torch.ones_like(denom))
    out = (acc / safe_denom.unsqueeze(-1)).to(outs[0].dtype)
    lse = torch.where(has_keys, shift + torch.log(safe_denom), torch.full_like(denom, float("-inf")))
    return out, lse
