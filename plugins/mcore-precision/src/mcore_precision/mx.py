"""MXFP8 (OCP Microscaling): the torch reference of its E8M0 block scales and its quantisation.

Shape legend: M rows, R the GEMM's reduction dim (the last one). A block is 32 consecutive elements of a row
along R; each block shares one power-of-two scale ``X = 2**k`` (E8M0: ``k`` in ``[-127, 127]``, code 255 NaN).
The elements are stored as ``fp8(x / X)`` (E4M3 or E5M2, saturating). Two rules pick ``k`` from the block's
amax (``emax``: the exponent of the element format's largest binade, 8 for E4M3, 15 for E5M2):

* ``"up"`` (NVIDIA's recipe, the default): the smallest ``k`` with ``amax / 2**k <= fmax``, so no element
  saturates (``2**k`` is ``amax / fmax`` rounded up to a power of two);
* ``"floor"`` (the OCP spec): ``k = floor(log2(amax)) - emax``; the block's largest elements may exceed
  ``fmax`` by up to a binade and saturate.

A block whose amax is 0 gets ``k = 0``; a non-finite amax gives a NaN scale (the block reads NaN, so the
step's finiteness check still sees it). ``k`` is found from ``frexp`` and exact power-of-two arithmetic: no
``log2`` rounding. A ragged last block (``R`` not a multiple of 32) takes the amax of the elements it has
(as if zero-padded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from mcore_precision.formats import FP8Format, quantize
from mcore_precision.kernels import quantize_mx

__all__ = ["MX_BLOCK", "MXTensor", "e8m0_exponents", "mx_quantize", "mx_quantize_reference"]

MX_BLOCK = 32
Rounding = Literal["up", "floor"]


def _emax(fmt: FP8Format) -> int:
    return math.frexp(fmt.max)[1] - 1  # 448 = 1.75 * 2**8 -> 8 (plain Python: no graph break under compile)


def pow2(k: torch.Tensor) -> torch.Tensor:
    """``2**k`` in fp32 for integral fp32 ``k`` in ``[-127, 127]`` (NaN stays NaN), exactly on every device: built
    from the bits. ``torch.exp2`` is not exact on CUDA (an H100 gave ``2**-127`` one ulp low, 2026-12-06) and
    ``torch.ldexp`` multiplies by a power computed the same way."""
    whole = torch.nan_to_num(k, nan=0.0).to(torch.int32)
    normal = ((whole + 127).clamp(min=1) << 23).view(torch.float32)  # 2**k for k >= -126
    exact = torch.where(whole >= -126, normal, torch.full_like(normal, 2.0**-127))  # 2**-127 is subnormal
    return torch.where(torch.isnan(k), k.float(), exact)


def e8m0_exponents(amax: torch.Tensor, fmt: FP8Format, rounding: Rounding = "up") -> torch.Tensor:
    """The E8M0 exponent ``k`` (fp32, integral, in ``[-127, 127]``; NaN where ``amax`` is not finite) of each
    block's scale ``2**k`` for block maxima ``amax`` (module docstring)."""
    amax = amax.float()
    floor_log2 = torch.frexp(amax).exponent.float() - 1  # amax = m * 2**e with m in [0.5, 1): floor(log2) = e - 1
    k = floor_log2 - _emax(fmt)
    if rounding == "up":  # amax / 2**k lies in [2**emax, 2**(emax+1)): one binade up where it exceeds fmax
        k = torch.where(amax * pow2(-k.clamp(-127, 127)) > fmt.max, k + 1, k)
    k = torch.where(amax > 0, k.clamp(-127, 127), torch.zeros_like(k))
    return torch.where(torch.isfinite(amax), k, torch.full_like(k, float("nan")))


@dataclass(frozen=True, eq=False)
class MXTensor:
    """``data (M, R)`` fp8 codes and ``scale (M, ceil(R/32))``: each block's ``2**k`` in fp32 (NaN: E8M0 NaN)."""

    data: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """``q * 2**k`` in fp32."""
        return self.data.float() * _expand(self.scale, self.data.shape[-1])


def _expand(scale: torch.Tensor, columns: int) -> torch.Tensor:
    return scale.repeat_interleave(MX_BLOCK, dim=-1)[..., :columns]  # (M, R)


def mx_quantize(x: torch.Tensor, fmt: FP8Format, rounding: Rounding = "up") -> MXTensor:
    """``x (M, R)`` in 1x32 blocks along ``R``: E8M0 scales by ``rounding`` and elements ``fp8(x / 2**k)``
    (the Triton kernel on CUDA, ``mx_quantize_reference`` elsewhere: ``kernels``)."""
    if x.dim() != 2:
        raise ValueError(f"mx_quantize: x has shape {tuple(x.shape)}; allowed: a 2-D (M, R) tensor")
    data, scale = quantize_mx(x, fmt, rounding)
    return MXTensor(data, scale)


def mx_quantize_reference(
    x: torch.Tensor, fmt: FP8Format, rounding: Rounding = "up"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of ``mx_quantize``: ``(codes (M, R), scales (M, ceil(R/32)))``."""
    m, r = x.shape
    pad = -r % MX_BLOCK
    a = torch.nn.functional.pad(x.detach().float().abs(), (0, pad))  # (M, R'): zeros add no amax
    amax = a.view(m, (r + pad) // MX_BLOCK, MX_BLOCK).amax(dim=-1)  # (M, R'/32); NaN propagates
    k = e8m0_exponents(amax, fmt, rounding)
    scale = pow2(k)  # 2**k exactly (NaN: a block with a non-finite amax)
    return quantize(x, _expand(pow2(-k), r), fmt), scale
