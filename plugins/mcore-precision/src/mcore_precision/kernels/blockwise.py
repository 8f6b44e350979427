"""Block-scaled FP8 quantisation in Triton: DeepSeek-V3 blocks (``fp8-blockwise``: 1x128 activation and
gradient tiles, 128x128 weight blocks) and, with E8M0 scales, MXFP8's 1x32 blocks (``mx``). Scale and cast
in one pass: each program loads its blocks once, reduces their amax, writes their scales and codes.

Shape legend: M rows, R the reduction dim (the last one) of a 2-D ``x`` with any strides (a transposed view
quantises the column-wise copy, read coalesced along its contiguous dim); blocks ``(bm, br)``, the ragged
edge ones taking the amax of the elements they have. A program's tile is ``(ROWS, NB, BRP)``: ``ROWS`` rows
(one block row when ``bm > 1``), ``NB`` blocks along ``R`` of ``BRP >= br`` lanes each.

``RULE`` picks the scale: 0 the FP8 scale ``fmax / amax / 2**margin`` (``formats.blockwise_scales``), 1 and
2 MXFP8's E8M0 ``2**k`` rounded up (NVIDIA) or floored (OCP) (``mx.e8m0_exponents``). The torch references
are ``reference.quantize_blockwise`` / ``quantize_mx``; every byte and scale here equals theirs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_precision.formats import FP8Format
from mcore_precision.kernels._common import (
    abs_bits,
    e8m0_exponent,
    emax,
    fmt_args,
    fp8_code,
    pow2,
    scale_from_amax,
    to_f32,
)

__all__ = ["launch_blocks", "quantize_blockwise", "tile_shape"]


@triton.jit
def _blocks(
    X, Q, S, M, R, sxm, sxr, s_cols,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr, BRP: tl.constexpr,
    RULE: tl.constexpr, MARGIN_DIV: tl.constexpr, EMAX: tl.constexpr,
    FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, HAS_INF: tl.constexpr,
    HW_CVT: tl.constexpr,
):  # fmt: skip
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    i = tl.arange(0, ROWS)
    if BLOCK_M > 1:  # one block row: rows [pid_m * bm, (pid_m + 1) * bm)
        rows = pid_m * BLOCK_M + i
        row_ok = (i < BLOCK_M) & (rows < M)
    else:
        rows = pid_m * ROWS + i
        row_ok = rows < M
    blk = pid_r * NB + tl.arange(0, NB)  # (NB,) block index along R
    j = tl.arange(0, BRP)
    cols = blk[None, :, None] * BLOCK_R + j[None, None, :]  # (1, NB, BRP)
    mask = row_ok[:, None, None] & (j[None, None, :] < BLOCK_R) & (cols < R)  # (ROWS, NB, BRP)
    r64 = rows[:, None, None].to(tl.int64)
    x = tl.load(X + r64 * sxm + cols.to(tl.int64) * sxr, mask=mask, other=0.0)  # (ROWS, NB, BRP)
    bits = tl.max(abs_bits(x), axis=2)  # (ROWS, NB) amax bits per row and block
    if BLOCK_M > 1:
        bits = tl.max(bits, axis=0)[None, :]  # (1, NB): the block's amax over its rows
    amax = bits.to(tl.float32, bitcast=True)
    if RULE == 0:
        scale = scale_from_amax(amax, FMAX, MARGIN_DIV)
        factor = scale
    else:
        k, finite = e8m0_exponent(bits, EMAX, RULE == 1)
        nan = float("nan")
        scale = tl.where(finite, pow2(k), nan)
        factor = tl.where(finite, pow2(-k), nan)
    code = fp8_code(to_f32(x) * factor[:, :, None], FMAX, MANT, BIAS, HAS_INF, HW_CVT)
    tl.store(Q + r64 * R + cols, code, mask=mask)
    blk_ok = blk[None, :] < s_cols
    if BLOCK_M > 1:
        tl.store(S + pid_m * s_cols + blk[None, :], scale, mask=blk_ok)
    else:
        tl.store(S + rows[:, None].to(tl.int64) * s_cols + blk[None, :], scale, mask=row_ok[:, None] & blk_ok)


def tile_shape(x: torch.Tensor, block: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(ROWS, NB, BRP, warps)`` for ``x`` and ``block``: about 4k elements a program, read along the
    contiguous dim (many rows when the rows are strided, whole blocks along ``R`` when they are contiguous)."""
    bm, br = block
    brp = triton.next_power_of_2(br)
    if bm > 1:
        rows = triton.next_power_of_2(bm)
        nb = max(1, min(4096 // (rows * brp), triton.next_power_of_2(triton.cdiv(x.shape[1], br))))
        return rows, nb, brp, 8 if rows * nb * brp >= 8192 else 4
    if x.stride(1) != 1 and x.shape[0] > 1:  # strided rows: 64 of them side by side, 128-byte reads of bf16
        rows, elements = 64, 8192
    else:
        rows, elements = 4, 4096
    nb = max(1, min(elements // (rows * brp), triton.next_power_of_2(triton.cdiv(x.shape[1], br))))
    return rows, nb, brp, 8 if rows * nb * brp >= 8192 else 4


def launch_blocks(
    x: torch.Tensor, fmt: FP8Format, block: tuple[int, int], rule: int, margin: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, R)`` -> ``(q (M, R) in fmt's dtype, scale (ceil(M/bm), ceil(R/br)) fp32)`` by ``rule``."""
    m, r = x.shape
    bm, br = block
    args = fmt_args(fmt, x.device)
    q = torch.empty((m, r), dtype=torch.uint8, device=x.device)
    scale = torch.empty((triton.cdiv(m, bm), triton.cdiv(r, br)), dtype=torch.float32, device=x.device)
    if m and r:
        rows, nb, brp, warps = tile_shape(x, block)
        grid = (triton.cdiv(m, bm) if bm > 1 else triton.cdiv(m, rows), triton.cdiv(scale.shape[1], nb))
        _blocks[grid](
            x, q, scale, m, r, x.stride(0), x.stride(1), scale.shape[1],
            BLOCK_M=bm, BLOCK_R=br, ROWS=rows, NB=nb, BRP=brp, RULE=rule, MARGIN_DIV=2.0**margin, EMAX=emax(fmt),
            **args, num_warps=warps,
        )  # fmt: skip
    return q.view(fmt.dtype), scale


def quantize_blockwise(
    x: torch.Tensor, fmt: FP8Format, block: tuple[int, int] = (1, 128), margin: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, R)`` -> ``(q (M, R), scale (ceil(M/bm), ceil(R/br)))`` (module docstring; the reference's
    signature)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_blockwise: x has shape {tuple(x.shape)}; allowed: a 2-D (M, R) tensor")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"quantize_blockwise: block = {block!r}; allowed: two positive ints (rows, columns)")
    return launch_blocks(x, fmt, (int(block[0]), int(block[1])), rule=0, margin=margin)
