"""Rowwise FP8 quantisation in Triton (``fp8-rowwise``): per-row amax and cast, one program per band of rows.

Shape legend: M rows, R the reduction dim (the last one) of a 2-D ``x`` with any strides: a transposed view
``t.t()`` gives the column-wise copy the backward GEMMs need, read coalesced along its contiguous dim. The
torch reference is ``reference.quantize_rowwise``; every byte and scale here equals it.

A row that fits one chunk (``R <= BR``) is read once and kept in registers; a longer one is read twice, chunk
by chunk (amax, then cast), the second read mostly from cache for contiguous rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_precision.formats import FP8Format
from mcore_precision.kernels._common import abs_bits, fmt_args, fp8_code, scale_from_amax, to_f32

__all__ = ["quantize_rowwise"]


@triton.jit
def _rowwise(
    X, Q, S, M, R, sxm, sxr,
    BM: tl.constexpr, BR: tl.constexpr, ONE_CHUNK: tl.constexpr, MARGIN_DIV: tl.constexpr,
    FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, HAS_INF: tl.constexpr,
    HW_CVT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    r64 = rows[:, None].to(tl.int64)
    row_ok = rows[:, None] < M
    best = tl.zeros((BM, BR), dtype=tl.int32)
    if ONE_CHUNK:
        cols = tl.arange(0, BR)[None, :]
        mask = row_ok & (cols < R)
        x = tl.load(X + r64 * sxm + cols.to(tl.int64) * sxr, mask=mask, other=0.0)  # (BM, BR)
        scale = scale_from_amax(tl.max(abs_bits(x), axis=1).to(tl.float32, bitcast=True), FMAX, MARGIN_DIV)  # (BM,)
        tl.store(Q + r64 * R + cols, fp8_code(to_f32(x) * scale[:, None], FMAX, MANT, BIAS, HAS_INF, HW_CVT), mask=mask)
    else:
        for start in range(0, R, BR):
            cols = start + tl.arange(0, BR)[None, :]
            x = tl.load(X + r64 * sxm + cols.to(tl.int64) * sxr, mask=row_ok & (cols < R), other=0.0)
            best = tl.maximum(best, abs_bits(x))
        scale = scale_from_amax(tl.max(best, axis=1).to(tl.float32, bitcast=True), FMAX, MARGIN_DIV)  # (BM,)
        for start in range(0, R, BR):
            cols = start + tl.arange(0, BR)[None, :]
            mask = row_ok & (cols < R)
            x = tl.load(X + r64 * sxm + cols.to(tl.int64) * sxr, mask=mask, other=0.0)
            code = fp8_code(to_f32(x) * scale[:, None], FMAX, MANT, BIAS, HAS_INF, HW_CVT)
            tl.store(Q + r64 * R + cols, code, mask=mask)
    tl.store(S + rows, scale, mask=rows < M)


def _tiles(x: torch.Tensor) -> tuple[int, int, int]:
    """``(BM, BR, warps)``: long contiguous rows one per program; strided rows (a transposed view) in bands
    of 64 along the contiguous dim, short chunks of the row each."""
    m, r = x.shape
    if x.stride(1) == 1 or m == 1:
        br = min(triton.next_power_of_2(max(r, 1)), 8192)
        return 1, br, 8 if br >= 4096 else 4
    return 64, min(triton.next_power_of_2(max(r, 1)), 64), 4


def quantize_rowwise(x: torch.Tensor, fmt: FP8Format, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, R)`` -> ``(q (M, R), scale (M, 1))`` (module docstring; the reference's signature)."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"quantize_rowwise: x has shape {tuple(x.shape)}; allowed: a 2-D (M, R) tensor, R > 0")
    m, r = x.shape
    args = fmt_args(fmt, x.device)
    q = torch.empty((m, r), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        bm, br, warps = _tiles(x)
        _rowwise[(triton.cdiv(m, bm),)](
            x, q, scale, m, r, x.stride(0), x.stride(1),
            BM=bm, BR=br, ONE_CHUNK=r <= br, MARGIN_DIV=2.0**margin,
            **args, num_warps=warps,
        )  # fmt: skip
    return q.view(fmt.dtype), scale
