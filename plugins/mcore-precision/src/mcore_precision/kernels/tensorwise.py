"""Per-tensor FP8 quantisation in Triton (``fp8-current``, ``fp8-delayed``): amax, then one fused cast.

Shape legend: M rows, K columns of a 2-D ``x`` (any strides). The torch reference is
``reference.quantize_tensorwise``; every byte and scale here equals it.

* Current scaling (``scale=None``): ``_amax_partials`` reads ``x`` once over a grid of tiles (each program
  folds a stride of tiles into one partial max of the ``|x|`` bits), ``_finish`` reduces the partials and
  writes the amax and the scale, then ``_cast`` reads ``x`` once more and writes the FP8 copy, and its
  transpose ``(K, M)`` too when asked (both from the same loaded tile).
* Given scale (delayed scaling): ``_cast`` casts with it and folds the amax of the tile it read into a
  partial in the same pass; ``_finish`` reduces them. One read of ``x``.

The amax is reduced over int32 bits of ``|x|`` (``_common.abs_bits``): deterministic, NaN-propagating.
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
def _finish(
    P, AMAX, SCALE, n, BP: tl.constexpr, FMAX: tl.constexpr, MARGIN_DIV: tl.constexpr, WITH_SCALE: tl.constexpr
):
    best = tl.zeros((BP,), dtype=tl.int32)
    for start in range(0, n, BP):
        best = tl.maximum(best, tl.load(P + start + tl.arange(0, BP), mask=start + tl.arange(0, BP) < n, other=0))
    amax = tl.max(best, axis=0).to(tl.float32, bitcast=True)
    tl.store(AMAX, amax)
    if WITH_SCALE:
        tl.store(SCALE, scale_from_amax(amax, FMAX, MARGIN_DIV))


@triton.jit
def _cast(
    X, SCALE, Q, QT, P, M, K, sxm, sxk,
    BM: tl.constexpr, BK: tl.constexpr, TRANSPOSE: tl.constexpr, PARTIALS: tl.constexpr,
    FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, HAS_INF: tl.constexpr,
    HW_CVT: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    r64, c64 = rows[:, None].to(tl.int64), cols[None, :].to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(X + r64 * sxm + c64 * sxk, mask=mask, other=0.0)  # (BM, BK)
    code = fp8_code(to_f32(x) * tl.load(SCALE), FMAX, MANT, BIAS, HAS_INF, HW_CVT)
    tl.store(Q + r64 * K + c64, code, mask=mask)
    if TRANSPOSE:
        tl.store(QT + c64 * M + r64, code, mask=mask)  # (K, M) row-major
    if PARTIALS:
        tl.store(P + pid_m * tl.num_programs(1) + pid_k, tl.max(tl.max(abs_bits(x), axis=1), axis=0))


def amax_and_scale(x: torch.Tensor, fmax: float, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, K)``'s amax (NaN when it has one; 0 when empty) and the scale ``fmax / amax / 2**margin``
    (``formats.amax_to_scale``), both 0-d fp32: ``_amax_partials`` then ``_finish``."""
    m, k = x.shape
    tiles = triton.cdiv(m, _BM) * triton.cdiv(k, _BK)
    programs = max(1, min(tiles, _MAX_PARTIALS))
    partials = torch.empty(programs, dtype=torch.int32, device=x.device)
    amax = torch.empty((), dtype=torch.float32, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    _amax_partials[(programs,)](
        x, partials, m, k, x.stride(0), x.stride(1), triton.cdiv(k, _BK), tiles, programs, BM=_BM, BK=_BK, num_warps=8
    )
    _finish[(1,)](
        partials, amax, scale, programs, BP=1024,
        FMAX=fmax, MARGIN_DIV=2.0**margin, WITH_SCALE=True,
    )  # fmt: skip
    return amax, scale


def quantize_tensorwise(
    x: torch.Tensor, fmt: FP8Format, margin: int = 0, scale: torch.Tensor | None = None, transpose: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``x (M, K)`` -> ``(q (M, K), q.T (K, M) or None, scale (), amax ())`` (module docstring; the reference's
    signature)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_tensorwise: x has shape {tuple(x.shape)}; allowed: a 2-D (M, K) tensor")
    m, k = x.shape
    args = fmt_args(fmt, x.device)
    q = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    qt = torch.empty((k, m), dtype=torch.uint8, device=x.device) if transpose else None
    qt_arg = q if qt is None else qt  # a placeholder pointer when no transpose is written
    grid = (triton.cdiv(m, _BM), triton.cdiv(k, _BK))
    if scale is None:
        amax, scale = amax_and_scale(x, fmt.max, margin)
        if m and k:
            _cast[grid](
                x, scale, q, qt_arg, q, m, k, x.stride(0), x.stride(1),
                BM=_BM, BK=_BK, TRANSPOSE=transpose, PARTIALS=False, **args, num_warps=8,
            )  # fmt: skip
    else:
        amax = torch.empty((), dtype=torch.float32, device=x.device)
        scale = scale.to(device=x.device, dtype=torch.float32).reshape(())
        partials = torch.empty(max(grid[0] * grid[1], 1), dtype=torch.int32, device=x.device)
        if m and k:
            _cast[grid](
                x, scale, q, qt_arg, partials, m, k, x.stride(0), x.stride(1),
                BM=_BM, BK=_BK, TRANSPOSE=transpose, PARTIALS=True, **args, num_warps=8,
            )  # fmt: skip
        else:
            partials.zero_()
        _finish[(1,)](
            partials, amax, amax, partials.numel(), BP=1024,
            FMAX=fmt.max, MARGIN_DIV=1.0, WITH_SCALE=False,
        )  # fmt: skip
    return q.view(fmt.dtype), None if qt is None else qt.view(fmt.dtype), scale, amax
