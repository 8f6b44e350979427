"""SwiGLU forward and backward in Triton: ``silu(gate) * up`` from two tensors of the same shape.

Gate and up are read from their own tensors (the outputs of the separate ``gate`` and ``up``
projections); the forward saves only its inputs; the backward recomputes ``sigmoid(gate)`` and
writes both input gradients, each to its own tensor, in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd(G, U, Y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    offsets = row * F + cols
    gate = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(G, U, DY, DG, DU, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    offsets = row * F + cols
    gate = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DG + offsets, dgate.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offsets, (dy * silu).to(DU.dtype.element_ty), mask=mask)


_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):  # type: ignore[override]
        assert gate.shape == up.shape and gate.dtype == up.dtype, (gate.shape, up.shape, gate.dtype, up.dtype)
        shape = gate.shape
        f = shape[-1]
        g = gate.reshape(-1, f).contiguous()  # (M, F)
        u = up.reshape(-1, f).contiguous()  # (M, F)
        rows = g.shape[0]
        y = torch.empty_like(g)
        _swiglu_fwd[(rows, triton.cdiv(f, _BLOCK))](g, u, y, f, BLOCK=_BLOCK, num_warps=4)
        ctx.save_for_backward(g, u)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        g, u = ctx.saved_tensors
        rows, f = g.shape
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _swiglu_bwd[(rows, triton.cdiv(f, _BLOCK))](
            g, u, dy.reshape(rows, f).contiguous(), dg, du, f, BLOCK=_BLOCK, num_warps=4
        )
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)
