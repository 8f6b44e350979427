"""Cross-entropy over one chunk of logits in Triton, gradient written in place (see ``linear_ce``).

One program per row: pass 1 streams the vocabulary in blocks with an online max/sum to get the
log-sum-exp; pass 2 overwrites the logits with ``scale * (softmax - onehot)`` (zero for ignored
rows). No fp32 copy of the chunk is made.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_models.kernels.linear_ce import IGNORE_INDEX


@triton.jit
def _ce_kernel(LOGITS, LABELS, LOSS, stride, V, scale, ignore_index, BLOCK: tl.constexpr):
    # torch.compile may pass a Python float as fp64: pin it to fp32 so the loop-carried values keep one type
    scale = scale.to(tl.float32)
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    target = tl.load(base + label, mask=valid, other=0.0).to(tl.float32) * scale
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale
        new_m = tl.maximum(m, tl.max(z, axis=0))
        total = total * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
        m = new_m
    lse = m + tl.log(total)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))
    grad_scale = tl.where(valid, scale, 0.0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * scale
        p = tl.exp(z - lse)
        grad = tl.where(cols == label, p - 1.0, p) * grad_scale
        tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def ce_chunk(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-row loss ``(n,)`` fp32; ``logits (n, V)`` is overwritten with d loss / d logits."""
    assert logits.stride(-1) == 1
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block = min(4096, triton.next_power_of_2(vocab))
    _ce_kernel[(rows,)](
        logits, labels.contiguous(), loss, logits.stride(0), vocab, scale, IGNORE_INDEX, BLOCK=block, num_warps=8
    )
    return loss
