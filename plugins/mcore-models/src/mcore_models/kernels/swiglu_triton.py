"""SwiGLU forward and backward in Triton: ``silu(gate) * up``, from two tensors or from packed rows.

Two entry points share one pair of kernels that read gate and up through a row stride:

- ``swiglu(gate, up)``: the outputs of separate ``gate`` and ``up`` projections (each ``(M, F)``,
  row stride ``F``), as under tensor parallelism where each is its own sharded GEMM;
- ``swiglu_packed(packed)``: one GEMM's ``(M, 2F)`` rows ``[gate | up]`` (``blocks.base.fused_projection``),
  read in place (row stride ``2F``, up at column offset ``F``) and differentiated into ONE ``(M, 2F)``
  gradient buffer, so neither a copy of the halves nor a concatenation of their gradients is made.

The forward saves only its inputs; the backward recomputes ``sigmoid(gate)`` and writes both input
gradients in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd(G, U, Y, F, in_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    offsets = row * in_stride + cols
    gate = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + row * F + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(G, U, DY, DG, DU, F, in_stride, BLOCK: tl.constexpr):
    """``DG``/``DU`` have the inputs' row stride (``in_stride``); ``DY`` is ``(M, F)`` contiguous."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    offsets = row * in_stride + cols
    gate = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DG + offsets, dgate.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offsets, (dy * silu).to(DU.dtype.element_ty), mask=mask)


_BLOCK = 1024


def _forward(gate: torch.Tensor, up: torch.Tensor, rows: int, f: int, in_stride: int) -> torch.Tensor:
    y = torch.empty((rows, f), dtype=gate.dtype, device=gate.device)  # (M, F)
    _swiglu_fwd[(rows, triton.cdiv(f, _BLOCK))](gate, up, y, f, in_stride, BLOCK=_BLOCK, num_warps=4)
    return y


def _backward(
    gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor, in_stride: int
) -> None:
    rows, f = dy.shape
    _swiglu_bwd[(rows, triton.cdiv(f, _BLOCK))](gate, up, dy, dgate, dup, f, in_stride, BLOCK=_BLOCK, num_warps=4)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):  # type: ignore[override]
        assert gate.shape == up.shape and gate.dtype == up.dtype, (gate.shape, up.shape, gate.dtype, up.dtype)
        shape = gate.shape
        f = shape[-1]
        g = gate.reshape(-1, f).contiguous()  # (M, F); a no-op for a GEMM's output
        u = up.reshape(-1, f).contiguous()  # (M, F)
        ctx.save_for_backward(g, u)
        ctx.shape = shape
        return _forward(g, u, g.shape[0], f, f).view(shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        g, u = ctx.saved_tensors
        f = g.shape[1]
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _backward(g, u, dy.reshape(-1, f).contiguous(), dg, du, f)
        return dg.view(ctx.shape), du.view(ctx.shape)


class _SwiGLUPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed):  # type: ignore[override]
        shape = packed.shape
        assert shape[-1] % 2 == 0, shape
        f = shape[-1] // 2
        x = packed.reshape(-1, 2 * f).contiguous()  # (M, 2F) rows [gate | up]; a no-op for a GEMM's output
        ctx.save_for_backward(x)
        ctx.shape = shape
        return _forward(x, x[:, f:], x.shape[0], f, 2 * f).view(*shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        f = x.shape[1] // 2
        dx = torch.empty_like(x)  # (M, 2F): [dgate | dup], one buffer
        _backward(x, x[:, f:], dy.reshape(-1, f).contiguous(), dx, dx[:, f:], 2 * f)
        return dx.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of two ``(..., F)`` tensors."""
    return _SwiGLU.apply(gate, up)


def swiglu_packed(packed: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``(..., 2F)`` rows ``[gate | up]`` -> ``(..., F)``."""
    return _SwiGLUPacked.apply(packed)
