"""Triton SwiGLU forward and backward on ``(M, 2F)`` rows ``[gate | up]``: ``silu(gate) * up`` (optionally clamped).

Why: the unfused torch activation reads the GEMM output twice and writes three ``(M, F)`` intermediates; here the
forward reads each row once and writes ``(M, F)``, the backward recomputes the sigmoid from the saved input and
writes ``d[gate | up]`` as one ``(M, 2F)`` buffer (what the one gate-and-up grouped GEMM's backward wants). Loads
in the input's dtype (bf16), math in fp32, stores in the input's dtype. Rows are independent, so padding rows of a
fixed-capacity buffer (anything, NaN too) touch only themselves.

Clamped (``limit`` a): ``silu(min(g, a)) * clamp(u, -a, a)``; the gradient flows where ``g <= a`` and
``-a <= u <= a`` (as torch's ``clamp``). Shape legend: M rows, F features per half.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd(X, Y, F, x_stride, limit, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) features of this block
    mask = cols < F
    g = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * x_stride + F + cols, mask=mask, other=0.0).to(tl.float32)
    if CLAMP:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * F + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(X, DY, DX, F, x_stride, limit, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    """``DX`` has the input's row stride ``x_stride``; ``DY`` is ``(M, F)`` contiguous."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * x_stride + F + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    gc, uc = g, u
    if CLAMP:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
    s = tl.sigmoid(gc)
    dg = dy * uc * s * (1.0 + gc * (1.0 - s))  # d silu(g) / dg = s (1 + g (1 - s))
    du = dy * gc * s
    if CLAMP:
        dg = tl.where(g <= limit, dg, 0.0)
        du = tl.where((u >= -limit) & (u <= limit), du, 0.0)
    tl.store(DX + row * x_stride + cols, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * x_stride + F + cols, du.to(DX.dtype.element_ty), mask=mask)


_BLOCK = 1024


def _launch(kernel: Any, rows: int, f: int, *args: Any) -> None:
    if rows:
        block = min(_BLOCK, triton.next_power_of_2(f))
        kernel[(rows, triton.cdiv(f, block))](*args, BLOCK=block, num_warps=4)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor, limit: float | None) -> torch.Tensor:
        x = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()  # (M, 2F); a no-op on a GEMM's output
        f = x.shape[1] // 2
        y = x.new_empty((x.shape[0], f))  # (M, F)
        clamp = limit is not None
        _launch(_swiglu_fwd, x.shape[0], f, x, y, f, x.stride(0), 0.0 if limit is None else float(limit), clamp)
        ctx.save_for_backward(x)
        ctx.limit, ctx.shape = limit, gate_up.shape
        return y.view(*gate_up.shape[:-1], f)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return swiglu_triton_backward(x, dy, ctx.limit).view(ctx.shape), None


def swiglu_triton_backward(gate_up: torch.Tensor, dy: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """The gradient ``(M, 2F)`` ``[d gate | d up]`` of ``swiglu_triton`` at ``gate_up (M, 2F)`` (contiguous rows)
    for ``dy (..., F)``; also the backward of the fused grouped GEMM (``grouped_swiglu_triton``)."""
    f = gate_up.shape[1] // 2
    dx = torch.empty_like(gate_up)  # (M, 2F): [d gate | d up], one buffer
    dy = dy.reshape(-1, f).contiguous()  # (M, F)
    clamp = limit is not None
    x_stride = gate_up.stride(0)
    _launch(
        _swiglu_bwd, gate_up.shape[0], f, gate_up, dy, dx, f, x_stride, 0.0 if limit is None else float(limit), clamp
    )
    return dx


def swiglu_triton(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """``(..., 2F)`` rows ``[gate | up]`` -> ``silu(gate) * up`` ``(..., F)`` (clamped to ``limit`` when given)."""
    return _SwiGLU.apply(gate_up, limit)  # type: ignore[no-any-return]
