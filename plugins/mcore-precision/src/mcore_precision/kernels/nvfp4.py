"""NVFP4 quantisation in Triton: E2M1 values with E4M3 block scales and an fp32 tensor scale, rounded to
nearest or stochastically, one pass over ``x`` after its amax.

Shape legend: M rows, R the reduction dim (the last one) of a 2-D ``x`` with any strides; blocks ``1x16``
(activations, gradients) or ``16x16`` (weights). The torch reference is ``nvfp4.nvfp4_quantize_reference``
(``reference.quantize_nvfp4``); the values, block scales and tensor scale here equal it bit for bit:

* the tensor's amax and ``S = 448 * 6 / amax`` as in ``tensorwise`` (``amax_and_scale``);
* each program: its blocks' amax, the E4M3 decode scale ``e4m3(amax_block / 6 * S)``, the factor ``S / d``
  and the E2M1 values of ``x * factor`` (nearest, ties to the even grid index, or up with probability
  ``(|x| - lo) / (hi - lo)`` against the uniform draws ``u``);
* stochastic rounding takes ``u = torch.rand(x.shape, generator=...)`` drawn by the caller exactly as the
  reference draws it, so a seeded generator gives the same values on both paths.

``amax / 6`` is computed as torch computes a tensor divided by a Python number on ``x``'s device: an IEEE
division on CPU, a multiplication by the fp32 reciprocal on CUDA (``DIV_BY_RCP``). The values are stored as
fp32, as the reference keeps them (the GEMMs are emulated); packing two per byte is for a native GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_precision.formats import E4M3
from mcore_precision.kernels._common import abs_bits, fmt_args, fp8_code, pow2, to_f32
from mcore_precision.kernels.blockwise import tile_shape
from mcore_precision.kernels.tensorwise import amax_and_scale

__all__ = ["quantize_nvfp4"]


@triton.jit
def _e4m3_value(code):
    """The fp32 value of E4M3 bytes ``code`` (int32), exactly; NaN for the NaN codes."""
    e = (code >> 3) & 15
    m = code & 7
    mag = tl.where(
        e == 0, m.to(tl.float32) * pow2(tl.full(code.shape, -9, tl.int32)), (8 + m).to(tl.float32) * pow2(e - 10)
    )
    val = tl.where((code & 0x80) != 0, mag * -1.0, mag)  # (compiled, ``-mag`` is ``0 - mag``: +0 for 0)
    return tl.where((code & 0x7F) == 0x7F, float("nan"), val)


@triton.jit
def _round_e2m1(s, u, STOCHASTIC: tl.constexpr):
    """``s`` (fp32) on the E2M1 grid ``±{0, .5, 1, 1.5, 2, 3, 4, 6}``: nearest (ties to the even index) or
    stochastic against ``u``; saturating at 6; NaN kept."""
    ax = tl.minimum(tl.abs(s), 6.0)
    twice = tl.floor(ax * 2.0)
    low = tl.where(ax < 2.0, twice, tl.where(ax < 4.0, tl.floor(ax) + 2.0, tl.where(ax < 6.0, 6.0, 7.0)))
    lo = tl.where(ax < 2.0, twice * 0.5, tl.where(ax < 4.0, tl.floor(ax), tl.where(ax < 6.0, 4.0, 6.0)))
    hi = tl.where(low < 3.0, lo + 0.5, tl.where(low < 6.0, lo + 1.0, 6.0))
    hi = tl.where(low == 3.0, 2.0, hi)
    if STOCHASTIC:
        up = u * (hi - lo) < ax - lo
    else:
        odd = (low.to(tl.int32) % 2) == 1
        up = (hi - ax < ax - lo) | ((hi - ax == ax - lo) & odd)
    mag = tl.where(up, hi, lo)
    out = tl.where(s < 0, mag * -1.0, mag)  # -0.0 for a negative rounded to 0 (``-mag`` compiles to ``0 - mag``)
    return tl.where(s != s, s, out)


@triton.jit
def _nvfp4(
    X, U, ENCODE, Q, S, M, R, sxm, sxr, s_cols,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr, BRP: tl.constexpr,
    STOCHASTIC: tl.constexpr, DIV_BY_RCP: tl.constexpr,
    FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, HAS_INF: tl.constexpr,
    HW_CVT: tl.constexpr,
):  # fmt: skip
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    i = tl.arange(0, ROWS)
    if BLOCK_M > 1:
        rows = pid_m * BLOCK_M + i
        row_ok = (i < BLOCK_M) & (rows < M)
    else:
        rows = pid_m * ROWS + i
        row_ok = rows < M
    blk = pid_r * NB + tl.arange(0, NB)
    j = tl.arange(0, BRP)
    cols = blk[None, :, None] * BLOCK_R + j[None, None, :]  # (1, NB, BRP)
    mask = row_ok[:, None, None] & (j[None, None, :] < BLOCK_R) & (cols < R)  # (ROWS, NB, BRP)
    r64 = rows[:, None, None].to(tl.int64)
    x = tl.load(X + r64 * sxm + cols.to(tl.int64) * sxr, mask=mask, other=0.0)  # (ROWS, NB, BRP)
    bits = tl.max(abs_bits(x), axis=2)  # (ROWS, NB)
    if BLOCK_M > 1:
        bits = tl.max(bits, axis=0)[None, :]  # (1, NB)
    block_amax = bits.to(tl.float32, bitcast=True)
    encode = tl.load(ENCODE)  # the tensor's S
    if DIV_BY_RCP:
        per_e2m1 = block_amax * (1.0 / 6.0)
    else:
        per_e2m1 = tl.math.div_rn(block_amax, tl.full(block_amax.shape, 6.0, tl.float32))
    code = fp8_code(per_e2m1 * encode, FMAX, MANT, BIAS, HAS_INF, HW_CVT)  # (., NB) E4M3 decode scales
    d = _e4m3_value(code.to(tl.int32))
    factor = tl.where(d == 0, 0.0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32) * encode, d))
    scaled = to_f32(x) * factor[:, :, None]
    if STOCHASTIC:
        u = tl.load(U + r64 * R + cols, mask=mask, other=0.0)
    else:
        u = scaled
    tl.store(Q + r64 * R + cols, _round_e2m1(scaled, u, STOCHASTIC), mask=mask)
    blk_ok = blk[None, :] < s_cols
    if BLOCK_M > 1:
        tl.store(S + pid_m * s_cols + blk[None, :], code, mask=blk_ok)
    else:
        tl.store(S + rows[:, None].to(tl.int64) * s_cols + blk[None, :], code, mask=row_ok[:, None] & blk_ok)


def quantize_nvfp4(
    x: torch.Tensor, block: tuple[int, int] = (1, 16), generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (M, R)`` -> ``(values (M, R) fp32, block scales (ceil(M/bm), ceil(R/br)) E4M3, tensor scale ()
    fp32)`` (module docstring; the reference's signature)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_nvfp4: x has shape {tuple(x.shape)}; allowed: a 2-D (M, R) tensor")
    m, r = x.shape
    bm, br = block
    _, encode = amax_and_scale(x, E4M3.max * 6.0)  # S = 448 * 6 / amax, as formats.amax_to_scale computes it
    q = torch.empty((m, r), dtype=torch.float32, device=x.device)
    scale = torch.empty((triton.cdiv(m, bm), triton.cdiv(r, br)), dtype=torch.uint8, device=x.device)
    u = None if generator is None else torch.rand(x.shape, generator=generator, device=x.device)
    if m and r:
        rows, nb, brp, warps = tile_shape(x, block)
        grid = (triton.cdiv(m, bm) if bm > 1 else triton.cdiv(m, rows), triton.cdiv(scale.shape[1], nb))
        args = fmt_args(E4M3, x.device)
        _nvfp4[grid](
            x, q if u is None else u, encode, q, scale, m, r, x.stride(0), x.stride(1), scale.shape[1],
            BLOCK_M=bm, BLOCK_R=br, ROWS=rows, NB=nb, BRP=brp, STOCHASTIC=u is not None,
            DIV_BY_RCP=x.device.type == "cuda",
            **args, num_warps=warps,
        )  # fmt: skip
    return q, scale.view(torch.float8_e4m3fn), encode
