"""RMSNorm forward and backward in Triton (imported only on CUDA; see ``rmsnorm`` for the reference).

Forward: one program per row, fp32 statistics, saves ``rstd`` per row. Backward: each program
walks a band of rows, writes ``dx`` and accumulates its partial ``dgamma`` in fp32 registers;
the partials ``(programs, H)`` are summed at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, offset, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW, stride, M, N, offset, rows_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, M)
    for row in range(start, end):
        r = row.to(tl.int64)  # type: ignore[attr-defined]
        x = tl.load(X + r * stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        xhat = x * rstd
        wdy = w * dy
        c = tl.sum(xhat * wdy, axis=0) / N
        tl.store(DX + r * stride + cols, ((wdy - xhat * c) * rstd).to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW + pid * N + cols, dw, mask=mask)


def _launch_params(n: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float):  # type: ignore[override]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (M, N)
        rows, n = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block, warps = _launch_params(n)
        _rmsnorm_fwd[(rows,)](
            x2, weight, y, rstd, x2.stride(0), y.stride(0), n, eps, offset, BLOCK=block, num_warps=warps
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        rows, n = x2.shape
        dy2 = dy.reshape(rows, n).contiguous()
        dx = torch.empty_like(x2)
        programs = min(rows, 16 * torch.cuda.get_device_properties(x2.device).multi_processor_count)
        per_program = triton.cdiv(rows, programs)
        programs = triton.cdiv(rows, per_program)
        dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x2.device)
        block, warps = _launch_params(n)
        _rmsnorm_bwd[(programs,)](
            dy2,
            x2,
            weight,
            rstd,
            dx,
            dw_partial,
            x2.stride(0),
            rows,
            n,
            ctx.offset,
            per_program,
            BLOCK=block,
            num_warps=warps,
        )
        return dx.view(dy.shape), dw_partial.sum(0).to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps, offset)
