"""Triton kernels of the permutation's backward and the weighted combine: gathers by the known permutation.

Why: the dispatcher sorts a token's K slots to rows grouped by expert, so each row comes from exactly one slot
and each token's rows are known (``positions (N, K)``: the row of each slot, -1 where the slot has none). The
combine then needs no ``index_add`` into an fp32 buffer: one program per token and column block gathers its K rows
one after the other, multiplies them by the routing weights and sums them in fp32 registers, storing the sum once
in the rows' dtype. Its backward is
as deterministic (no atomics): the same program reads the token's output gradient once per H block, writes each of
its rows' gradient ``w * d out`` (every row belongs to one slot: no two programs write one row) and accumulates the
K weight gradients ``<d out, row>`` in registers. The permutation's own backward (rows back to tokens) is the
combine's forward with unit weights.

Shape legend: N tokens, K slots per token, H hidden size, M rows (grouped by expert; padding rows are never read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_H = 256
#: Columns of one ``_gather_sum`` program. A tile of the token's K rows reduced over K (the earlier kernel, 256
#: columns) moved 0.5 TB/s; K 1-D row loads summed in registers move 2.8 TB/s (95% of a copy) at 256 to 2048
#: columns (``benchmarks/device/sweep_gather_sum.py``, H100, 2026-12-07: 8192 x 8 x 2048 in 108.9 us against
#: 606 us).
_GATHER_BLOCK_H = 1024


@triton.jit
def _gather_sum(ROWS, POS, W, OUT, H, K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_H: tl.constexpr):
    """``OUT[t, cols] = sum over k of W[t, k] * ROWS[POS[t, k], cols]`` (slots with ``POS < 0`` give nothing): program
    ``(t, c)`` takes token ``t``'s column block ``c``, its K rows read one after the other into fp32 registers."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    cmask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        pos = tl.load(POS + t * K + k)  # int64 row of slot k; < 0: none
        valid = cmask & ((tl.zeros([BLOCK_H], dtype=tl.int64) + pos) >= 0)  # (BLOCK_H,): a vector mask
        row = tl.load(ROWS + pos * H + cols, mask=valid, other=0.0).to(tl.float32)  # (BLOCK_H,)
        if WEIGHTED:
            weight = tl.load(W + t * K + k).to(tl.float32)  # (in bounds: (N, K)); a dropped slot's is not used
            row = row * tl.where(pos >= 0, weight, 0.0)
        acc += row
    tl.store(OUT + t * H + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


@triton.jit
def _combine_bwd(DOUT, ROWS, POS, W, DROWS, DW, H, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """``DROWS[POS[t, k]] = W[t, k] * DOUT[t]``, ``DW[t, k] = <DOUT[t], ROWS[POS[t, k]]>`` (fp32), one token each."""
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    pos = tl.load(POS + t * K + ks, mask=ks < K, other=-1)  # (K_PAD,)
    valid = pos >= 0
    w = tl.load(W + t * K + ks, mask=valid, other=0.0).to(tl.float32)  # (K_PAD,)
    acc = tl.zeros([K_PAD], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        cmask = cols < H
        both = valid[:, None] & cmask[None, :]
        dout = tl.load(DOUT + t * H + cols, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_H,)
        at = pos[:, None] * H + cols[None, :]  # (K_PAD, BLOCK_H)
        tile = tl.load(ROWS + at, mask=both, other=0.0).to(tl.float32)
        acc += tl.sum(tile * dout[None, :], axis=1)
        tl.store(DROWS + at, (w[:, None] * dout[None, :]).to(DROWS.dtype.element_ty), mask=both)
    tl.store(DW + t * K + ks, acc, mask=ks < K)


def gather_sum(rows: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``rows (M, H)``, ``positions (N, K)`` int64, ``weights (N, K)`` or ``None`` (unit) -> ``(N, H)`` in the rows'
    dtype: each token's rows, weighted, summed in fp32."""
    rows, positions = rows.contiguous(), positions.contiguous()
    n, k = positions.shape
    h = rows.shape[1]
    out = rows.new_empty((n, h))
    if n:
        w = positions if weights is None else weights.contiguous()  # (an unread placeholder when unweighted)
        grid = (n, triton.cdiv(h, _GATHER_BLOCK_H))
        _gather_sum[grid](rows, positions, w, out, h, K=k, WEIGHTED=weights is not None, BLOCK_H=_GATHER_BLOCK_H)
    return out


def combine_backward(
    grad: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor, *, padded: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d rows (M, H), d weights (N, K) fp32)`` of ``gather_sum(rows, positions, weights)`` for ``grad (N, H)``;
    ``padded``: some rows belong to no slot (their gradient is zero)."""
    grad, rows, positions, weights = grad.contiguous(), rows.contiguous(), positions.contiguous(), weights.contiguous()
    n, k = positions.shape
    h = rows.shape[1]
    d_rows = torch.zeros_like(rows) if padded else torch.empty_like(rows)  # every row is written unless padded
    d_weights = torch.empty((n, k), dtype=torch.float32, device=rows.device)
    if n:
        k_pad = max(2, triton.next_power_of_2(k))  # (a power of two; not 1: a (1, BLOCK_H) tile)
        _combine_bwd[(n,)](grad, rows, positions, weights, d_rows, d_weights, h, K=k, K_PAD=k_pad, BLOCK_H=_BLOCK_H)
    return d_rows, d_weights
