"""Per-tensor FP8 quantisation in Triton (``fp8-current``, ``fp8-delayed``): amax, then one fused cast.

Shape legend: M rows, K columns of a 2-D ``x`` (any strides). The torch reference is
``reference.quantize_tensorwise``; every byte and scale here equals it.

* Current scaling (``scale=None``): ``_amax_partials`` reads ``x`` once over a grid of tiles (each program
  folds a stride of tiles into one partial max of the ``|x|`` bits), then ``_cast`` reads ``x`` once more and
  writes the FP8 copy, and its transpose ``(K, M)`` too when asked (both from the same loaded tile); every
  ``_cast`` program reduces the (at most ``_MAX_PARTIALS``) partials itself, so no launch sits between the two
  and program ``(0, 0)`` writes the amax, the scale and its reciprocal. Two launches: on the small GEMMs of a
  training step the FP8 linear is bound by the host's launches (``benchmarks/RESULTS.md``).
* Given scale (delayed scaling): ``_cast`` casts with it and folds the amax of the tile it read into a
  partial in the same pass; ``_finish`` reduces them. One read of ``x``.

Both write the decode scale ``1 / scale`` (IEEE division, as ``torch.reciprocal``) that the native GEMM takes,
so it needs no launch of its own. The amax is reduced over int32 bits of ``|x|`` (``_common.abs_bits``):
deterministic, NaN-propagating.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_precision.formats import FP8Format
from mcore_precision.kernels._common import abs_bits, fmt_args, fp8_code, scale_from_amax, to_f32

__all__ = ["amax_and_scale", "quantize_tensorwise"]

_BM, _BK = 64, 128  # cast tile
_MAX_PARTIALS = 1024
_OUT_FLOATS = 9
"""The scalars a quantisation writes, one fp32 buffer: ``1 / scale`` at 0, the scale at 4, the amax at 8: each on
a 16-byte boundary (cuBLASLt refused a decode scale 8 bytes into it: ``CUBLAS_STATUS_NOT_SUPPORTED``, H100,
torch 2.11, 2026-12-07)."""


@triton.jit
def _amax_partials(X, P, M, K, sxm, sxk, tiles_k, num_tiles, programs, BM: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    best = tl.zeros((BM, BK), dtype=tl.int32)
    for tile in range(pid, num_tiles, programs):
        rows = (tile // tiles_k) * BM + tl.arange(0, BM)
        cols = (tile % tiles_k) * BK + tl.arange(0, BK)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(X + rows[:, None].to(tl.int64) * sxm + cols[None, :].to(tl.int64) * sxk, mask=mask, other=0.0)
        best = tl.maximum(best, abs_bits(x))  # (BM, BK)
    tl.store(P + pid, tl.max(tl.max(best, axis=1), axis=0))


@triton.jit
def _reduce_partials(P, n, BP: tl.constexpr):
    """The max of the ``n`` int32 partials at ``P``, as the fp32 amax they are the bits of (one block of ``BP``
    when ``n <= BP``: the amax partials of current scaling)."""
    best = tl.zeros((BP,), dtype=tl.int32)
    for start in range(0, n, BP):
        best = tl.maximum(best, tl.load(P + start + tl.arange(0, BP), mask=start + tl.arange(0, BP) < n, other=0))
    return tl.max(best, axis=0).to(tl.float32, bitcast=True)


@triton.jit
def _finish(
    P, OUT, n, BP: tl.constexpr, FMAX: tl.constexpr, MARGIN_DIV: tl.constexpr, WITH_SCALE: tl.constexpr,
    SCALE_IN,
):  # fmt: skip
    """``OUT[8]`` the amax of the partials; ``OUT[4]`` the scale from it and ``OUT[0]`` its reciprocal
    (``WITH_SCALE``), or ``OUT[0]`` the reciprocal of the given ``SCALE_IN`` (``_OUT_FLOATS``)."""
    amax = _reduce_partials(P, n, BP)
    tl.store(OUT + 8, amax)
    one = tl.full((), 1.0, tl.float32)
    if WITH_SCALE:
        scale = scale_from_amax(amax, FMAX, MARGIN_DIV)
        tl.store(OUT + 4, scale)
        tl.store(OUT, tl.math.div_rn(one, scale))
    else:
        tl.store(OUT, tl.math.div_rn(one, tl.load(SCALE_IN)))


@triton.jit
def _cast(
    X, SCALE_IN, OUT, Q, QT, P, n_partials, M, K, sxm, sxk,
    BM: tl.constexpr, BK: tl.constexpr, TRANSPOSE: tl.constexpr, CURRENT: tl.constexpr, BP: tl.constexpr,
    FMAX: tl.constexpr, MARGIN_DIV: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr,
    HAS_INF: tl.constexpr, HW_CVT: tl.constexpr,
):  # fmt: skip
    """One ``(BM, BK)`` tile of ``x`` cast. ``CURRENT``: the scale from the amax partials ``P`` (program
    ``(0, 0)`` writes ``1 / scale``, the scale and the amax to ``OUT``: ``_OUT_FLOATS``); else the given
    ``SCALE_IN`` (program ``(0, 0)`` writes ``OUT[0] = 1 / scale``) and each program's partial amax to ``P``."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    first = (pid_m == 0) & (pid_k == 0)
    one = tl.full((), 1.0, tl.float32)
    if CURRENT:
        amax = _reduce_partials(P, n_partials, BP)
        scale = scale_from_amax(amax, FMAX, MARGIN_DIV)
        if first:
            tl.store(OUT + 8, amax)
            tl.store(OUT + 4, scale)
            tl.store(OUT, tl.math.div_rn(one, scale))
    else:
        scale = tl.load(SCALE_IN)
        if first:
            tl.store(OUT, tl.math.div_rn(one, scale))
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    r64, c64 = rows[:, None].to(tl.int64), cols[None, :].to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(X + r64 * sxm + c64 * sxk, mask=mask, other=0.0)  # (BM, BK)
    code = fp8_code(to_f32(x) * scale, FMAX, MANT, BIAS, HAS_INF, HW_CVT)
    tl.store(Q + r64 * K + c64, code, mask=mask)
    if TRANSPOSE:
        tl.store(QT + c64 * M + r64, code, mask=mask)  # (K, M) row-major
    if not CURRENT:
        tl.store(P + pid_m * tl.num_programs(1) + pid_k, tl.max(tl.max(abs_bits(x), axis=1), axis=0))


def _partials(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x``'s amax partials (int32, one a program of ``_amax_partials``, at most ``_MAX_PARTIALS``)."""
    m, k = x.shape
    tiles = triton.cdiv(m, _BM) * triton.cdiv(k, _BK)
    programs = max(1, min(tiles, _MAX_PARTIALS))
    partials = torch.empty(programs, dtype=torch.int32, device=x.device)
    _amax_partials[(programs,)](
        x, partials, m, k, x.stride(0), x.stride(1), triton.cdiv(k, _BK), tiles, programs, BM=_BM, BK=_BK, num_warps=8
    )
    return partials, programs


def amax_and_scale(x: torch.Tensor, fmax: float, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, K)``'s amax (NaN when it has one; 0 when empty) and the scale ``fmax / amax / 2**margin``
    (``formats.amax_to_scale``), both 0-d fp32: ``_amax_partials`` then ``_finish``."""
    partials, programs = _partials(x)
    out = torch.empty(_OUT_FLOATS, dtype=torch.float32, device=x.device)  # 1 / scale, scale, amax (_OUT_FLOATS)
    _finish[(1,)](
        partials, out, programs, BP=_MAX_PARTIALS, FMAX=fmax, MARGIN_DIV=2.0**margin, WITH_SCALE=True, SCALE_IN=out,
    )  # fmt: skip
    return out[8], out[4]


def quantize_tensorwise(
    x: torch.Tensor, fmt: FP8Format, margin: int = 0, scale: torch.Tensor | None = None, transpose: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (M, K)`` -> ``(q (M, K), q.T (K, M) or None, scale (), amax (), 1 / scale ())`` (module docstring;
    the reference's signature)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_tensorwise: x has shape {tuple(x.shape)}; allowed: a 2-D (M, K) tensor")
    m, k = x.shape
    args = fmt_args(fmt, x.device)
    q = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    qt = torch.empty((k, m), dtype=torch.uint8, device=x.device) if transpose else None
    qt_arg = q if qt is None else qt  # a placeholder pointer when no transpose is written
    out = torch.empty(_OUT_FLOATS, dtype=torch.float32, device=x.device)  # 1 / scale, scale, amax (_OUT_FLOATS)
    grid = (triton.cdiv(m, _BM), triton.cdiv(k, _BK))
    margin_div = 2.0**margin
    if scale is None:
        partials, programs = _partials(x)
        if m and k:
            _cast[grid](
                x, out, out, q, qt_arg, partials, programs, m, k, x.stride(0), x.stride(1),
                BM=_BM, BK=_BK, TRANSPOSE=transpose, CURRENT=True, BP=_MAX_PARTIALS, MARGIN_DIV=margin_div, **args,
                num_warps=8,
            )  # fmt: skip
        else:  # nothing to cast: the amax (0) and its scale alone
            _finish[(1,)](
                partials, out, programs, BP=_MAX_PARTIALS, FMAX=fmt.max, MARGIN_DIV=margin_div, WITH_SCALE=True,
                SCALE_IN=out,
            )  # fmt: skip
        scale = out[4]
    else:
        scale = scale.to(device=x.device, dtype=torch.float32).reshape(())
        partials = torch.empty(max(grid[0] * grid[1], 1), dtype=torch.int32, device=x.device)
        if m and k:
            _cast[grid](
                x, scale, out, q, qt_arg, partials, 0, m, k, x.stride(0), x.stride(1),
                BM=_BM, BK=_BK, TRANSPOSE=transpose, CURRENT=False, BP=_MAX_PARTIALS, MARGIN_DIV=1.0, **args,
                num_warps=8,
            )  # fmt: skip
        else:
            partials.zero_()
        _finish[(1,)](
            partials, out, partials.numel(), BP=_MAX_PARTIALS, FMAX=fmt.max, MARGIN_DIV=1.0, WITH_SCALE=False,
            SCALE_IN=scale,
        )  # fmt: skip
    return q.view(fmt.dtype), None if qt is None else qt.view(fmt.dtype), scale, out[8], out[0]
