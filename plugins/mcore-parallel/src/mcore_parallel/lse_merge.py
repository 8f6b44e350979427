"""Attention over one block of keys that also returns its log-sum-exp, and the exact merge of such blocks.

Context parallelism computes a query chunk's attention one key block at a time (ring) and combines
the blocks afterwards: with each block's output ``o_i`` and log-sum-exp ``l_i`` of its scores, the
attention over all keys is ``sum_i exp(l_i - L) o_i`` with ``L = logsumexp_i l_i``, exactly. This
module is that path, forward and backward: a torch reference (fp32 accumulation, any device) and, on
CUDA for bf16/fp16 inputs, fused kernels (``lse_kernels``); which one runs is said below:

* ``partial_attention(q, k, v, *, scale, mask) -> (out, lse)``: differentiable (autograd);
* ``merge(parts)`` / ``merge_with_lse(parts)``: the exact combination, differentiable;
* ``partial_attention_backward(...)``: the gradient of one block given the merged output and
  log-sum-exp (flash-attention's backward), for a ring whose backward passes dK/dV around.

A query row with no allowed key in a block (fully masked) gives ``lse = -inf`` and ``out = 0``, and
no NaN in forward or backward.

``mask`` is a dense bool tensor, ``None`` or a ``lse_kernels.BlockLayout`` (``describe_mask(mask)``: what the
kernels need to know about it, found once by the caller; with a tensor the fast path describes it on
every call, host syncs each time). Which path runs is chosen per call from the tensors (``_route``): on CUDA
with bf16/fp16 inputs, flash-attention for a mask that is empty, fully visible on a rectangle or causal,
FlexAttention for a general layout the caller gave a ``BlockMask`` (``describe_mask`` gives none, see
``lse_kernels``); the reference otherwise (documents, padding and windows in the ring; CPU, fp32, inside
a compiled region, head dims a kernel does not take). The fast paths' output and log-sum-exp are fp32
like the reference's. The flash path's autograd backward is the kernel's unless the log-sum-exp itself
receives a gradient (then the reference's: the kernel's backward has no term for it); FlexAttention's
backward takes both.

Shape legend: B rows, T queries, S keys, nh query heads, nkv key/value heads (``nh % nkv == 0``:
query head ``i`` reads key/value head ``i // (nh // nkv)``), hd query/key head dim, hdv value head
dim (MLA: ``hdv != hd``). ``mask``: bool ``(B or 1, T, S)``, True where the query may see the key;
``None``: every key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mcore_parallel.lse_kernels import (
    BlockLayout,
    Kernel,
    describe_mask,
    fast_backward,
    fast_forward,
    fast_inputs,
    flash_kernel,
    flex_backward,
    flex_forward,
    flex_usable,
)

Mask = torch.Tensor | BlockLayout | None


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, S, nkv, d)`` -> ``(B, nh, S, d)`` fp32, each key/value head repeated for its query heads."""
    x = x.float().transpose(1, 2)  # (B, nkv, S, d)
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def _fp32(device: torch.device) -> torch.autocast:
    """No autocast: under a bf16 recipe the reference still multiplies and accumulates in fp32."""
    return torch.autocast(device_type=device.type, enabled=False)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Masked scores ``(B, nh, T, S)`` fp32, ``-inf`` where the mask forbids."""
    qf = q.float().transpose(1, 2)  # (B, nh, T, hd)
    with _fp32(q.device):
        scores = qf @ _expand_kv(k, q.shape[2]).transpose(-1, -2) * scale  # (B, nh, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return scores


def _dense(mask: Mask) -> torch.Tensor | None:
    return mask.mask if isinstance(mask, BlockLayout) else mask


def _route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> tuple[Kernel | None, BlockLayout] | None:
    """Which path runs (module docstring): ``(flash kernel, layout)``, ``(None, layout)`` for FlexAttention on a
    general layout, or ``None`` for the reference."""
    if not fast_inputs(q, k, v):
        return None
    layout = mask if isinstance(mask, BlockLayout) else describe_mask(mask, q.shape[1], k.shape[1])
    if layout.kind == "general":
        return (None, layout) if flex_usable(q, k, v, layout) else None
    kernel = flash_kernel(q, k, v)
    return None if kernel is None else (kernel, layout)


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: Mask
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scale + mask) v`` over this block's keys, ``(B, T, nh, hdv)`` fp32, and the
    scores' log-sum-exp ``(B, nh, T)`` fp32 (``-inf`` for a query that sees no key here)."""
    route = _route(q, k, v, mask)
    if route is None:
        return reference_partial_attention(q, k, v, scale=scale, mask=_dense(mask))
    kernel, layout = route
    if kernel is None:
        return flex_forward(q, k, v, scale=scale, block_mask=layout.block_mask)
    return fast_partial_attention(kernel, q, k, v, scale=scale, layout=layout)


def fast_partial_attention(
    kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, layout: BlockLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """``partial_attention`` through ``kernel`` for a layout that is not ``"general"``, differentiable."""
    return _FastPartial.apply(q, k, v, kernel, layout, scale)  # type: ignore[no-any-return]


def reference_partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``partial_attention`` in fp32 torch on any device: autograd's backward, every mask."""
    scores = _scores(q, k, scale, mask)  # (B, nh, T, S)
    peak = scores.amax(dim=-1, keepdim=True).detach()  # (B, nh, T, 1): a stabiliser, not part of the value
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(scores - peak)  # (B, nh, T, S), 0 where masked
    total = weights.sum(dim=-1, keepdim=True)  # (B, nh, T, 1)
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))  # no log(0) and no 0/0, in forward or backward
    lse = torch.where(seen, peak + torch.log(safe), torch.full_like(total, float("-inf")))
    with _fp32(q.device):
        out = (weights / safe) @ _expand_kv(v, q.shape[2])  # (B, nh, T, hdv)
    return out.transpose(1, 2), lse.squeeze(-1)


def merge_with_lse(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of the blocks' keys from their ``(out (B, T, nh, hdv), lse (B, nh, T))``,
    and its log-sum-exp; exact (not an approximation), differentiable."""
    lses = torch.stack([lse for _, lse in parts])  # (P, B, nh, T)
    peak = lses.amax(dim=0).detach()  # (B, nh, T)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(lses - peak)  # (P, B, nh, T), 0 for a block the query does not see
    total = weights.sum(dim=0)  # (B, nh, T)
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))
    out = sum(
        (out_i * (w / safe).transpose(1, 2)[..., None] for (out_i, _), w in zip(parts, weights, strict=True)),
        torch.zeros_like(parts[0][0]),
    )  # (B, T, nh, hdv)
    lse = torch.where(seen, peak + torch.log(safe), torch.full_like(total, float("-inf")))
    return out, lse


def merge(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``merge_with_lse`` without the log-sum-exp: ``(B, T, nh, hdv)`` fp32."""
    return merge_with_lse(parts)[0]


def partial_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    scale: float,
    mask: Mask,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of the gradients ``(dq, dk, dv)`` (fp32, shapes of ``q``, ``k``, ``v``), given the
    MERGED output ``out (B, T, nh, hdv)`` and log-sum-exp ``lse (B, nh, T)`` over all blocks and their
    gradient ``grad_out``. Summing ``dq`` over the blocks gives the query gradient; each block's
    ``dk``/``dv`` is complete (flash-attention's backward: ``dS = P * (dP - rowsum(dO * O))``)."""
    route = _route(q, k, v, mask)
    if route is None:
        return reference_partial_attention_backward(q, k, v, out, lse, grad_out, scale=scale, mask=_dense(mask))
    kernel, layout = route
    if kernel is None:
        return flex_backward(q, k, v, out, lse, grad_out, scale=scale, block_mask=layout.block_mask)
    return fast_backward(kernel, q, k, v, out, lse, grad_out, scale=scale, layout=layout)


def reference_partial_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``partial_attention_backward`` in fp32 torch on any device, every mask."""
    heads, kv_heads = q.shape[2], k.shape[2]
    scores = _scores(q, k, scale, mask)  # (B, nh, T, S)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None]  # (B, nh, T, 1)
    probs = torch.exp(scores - safe_lse)  # (B, nh, T, S): the merged softmax restricted to this block
    do = grad_out.float().transpose(1, 2)  # (B, nh, T, hdv)
    vf = _expand_kv(v, heads)  # (B, nh, S, hdv)
    with _fp32(q.device):
        dv = probs.transpose(-1, -2) @ do  # (B, nh, S, hdv)
        dp = do @ vf.transpose(-1, -2)  # (B, nh, T, S)
        delta = (do * out.float().transpose(1, 2)).sum(dim=-1, keepdim=True)  # (B, nh, T, 1)
        ds = probs * (dp - delta) * scale  # (B, nh, T, S)
        dq = ds @ _expand_kv(k, heads)  # (B, nh, T, hd)
        dk = ds.transpose(-1, -2) @ q.float().transpose(1, 2)  # (B, nh, S, hd)
    batch, seq = k.shape[:2]
    group = heads // kv_heads

    def fold(x: torch.Tensor) -> torch.Tensor:  # (B, nh, S, d) -> (B, S, nkv, d): a kv head's query heads summed
        return x.view(batch, kv_heads, group, seq, -1).sum(dim=2).transpose(1, 2)

    return dq.transpose(1, 2), fold(dk), fold(dv)


class _FastPartial(torch.autograd.Function):
    """``partial_attention`` through a kernel: forward and backward are the kernel's, unless the log-sum-exp
    receives a gradient (the kernel's backward has no term for it): then the reference's backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Kernel, layout: BlockLayout, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = fast_forward(kernel, q, k, v, scale=scale, layout=layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kernel, ctx.layout, ctx.scale = kernel, layout, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        grads: tuple[torch.Tensor | None, ...]
        if grad_lse is not None:  # e.g. under ``merge_with_lse``: the reference, recomputed, takes both gradients
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                ref_out, ref_lse = reference_partial_attention(*leaves, scale=ctx.scale, mask=ctx.layout.mask)
                grad_out = torch.zeros_like(ref_out) if grad_out is None else grad_out
                grads = torch.autograd.grad((ref_out, ref_lse), leaves, (grad_out, grad_lse))
        elif grad_out is None:
            grads = (None, None, None)
        else:
            grads = fast_backward(ctx.kernel, q, k, v, out, lse, grad_out, scale=ctx.scale, layout=ctx.layout)
        dq, dk, dv = (None if g is None else g.to(x.dtype) for g, x in zip(grads, (q, k, v), strict=True))
        return dq, dk, dv, None, None, None
