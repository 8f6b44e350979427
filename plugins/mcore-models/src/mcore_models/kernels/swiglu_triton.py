"""SwiGLU forward and backward in Triton: ``silu(gate) * up`` from the fused ``[gate | up]`` rows.

The forward saves only its input; the backward recomputes ``sigmoid(gate)`` and writes both
halves of the input gradient in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd(X, Y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(X + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + row * F + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(X, DY, DX, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(X + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DX + row * 2 * F + cols, dgate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * 2 * F + F + cols, (dy * silu).to(DX.dtype.element_ty), mask=mask)


_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):  # type: ignore[override]
        shape = gate_up.shape
        x = gate_up.reshape(-1, shape[-1]).contiguous()  # (M, 2F)
        rows, f = x.shape[0], x.shape[1] // 2
        y = torch.empty((rows, f), dtype=x.dtype, device=x.device)
        _swiglu_fwd[(rows, triton.cdiv(f, _BLOCK))](x, y, f, BLOCK=_BLOCK, num_warps=4)
        ctx.save_for_backward(x)
        ctx.shape = shape
        return y.view(*shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        rows, f = x.shape[0], x.shape[1] // 2
        dx = torch.empty_like(x)
        _swiglu_bwd[(rows, triton.cdiv(f, _BLOCK))](
            x, dy.reshape(rows, f).contiguous(), dx, f, BLOCK=_BLOCK, num_warps=4
        )
        return dx.view(ctx.shape)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate_up)
