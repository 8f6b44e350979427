"""Residual add + RMSNorm forward in one Triton kernel (imported only on CUDA; see ``add_rmsnorm`` for the reference).

One program per row: loads the row of ``hidden`` and of ``delta``, adds them in fp32 and rounds the sum to the
output dtype first (what torch's ``hidden + delta`` gives), writes it as ``total``, then normalises that rounded
sum exactly as ``rmsnorm_triton._rmsnorm_fwd`` does (fp32 statistics, one rounding of the result). Both outputs
are fresh tensors (never written in place), so eager calls and CUDA-graph replays behave alike. No backward:
with gradients on and an input that requires them, the reference runs instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_models.kernels.add_rmsnorm import add_rms_norm_reference
from mcore_models.kernels.rmsnorm_triton import _launch_params

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _add_rmsnorm_fwd(A, B, W, S, Y, stride_a, stride_b, stride_s, stride_y, N, eps, offset, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    s = (a + b).to(S.dtype.element_ty)  # rounded like torch's add (fp32 opmath, one rounding)
    tl.store(S + row * stride_s + cols, s, mask=mask)
    x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden + delta, rms_norm(hidden + delta))`` of ``(..., H)`` rows of the same shape; the reference for
    broadcasting shapes, other dtypes than fp32/fp16/bf16, or inputs that need gradients."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, delta, weight))
    dtype = torch.promote_types(hidden.dtype, delta.dtype)
    if needs_grad or hidden.shape != delta.shape or dtype not in _DTYPES:
        return add_rms_norm_reference(hidden, delta, weight, eps, offset)
    shape = hidden.shape
    a = hidden.reshape(-1, shape[-1]).contiguous()  # (M, N)
    b = delta.reshape(-1, shape[-1]).contiguous()  # (M, N)
    rows, n = a.shape
    total = torch.empty((rows, n), dtype=dtype, device=a.device)
    normed = torch.empty_like(total)
    if rows:
        block, warps = _launch_params(n)
        _add_rmsnorm_fwd[(rows,)](
            a,
            b,
            weight,
            total,
            normed,
            a.stride(0),
            b.stride(0),
            total.stride(0),
            normed.stride(0),
            n,
            eps,
            offset,
            BLOCK=block,
            num_warps=warps,
        )
    return total.view(shape), normed.view(shape)
