"""NVFP4: the torch reference of E2M1 values, their two-level scales, stochastic rounding and the random
Hadamard transform (RHT).

Shape legend: M rows, R the GEMM's reduction dim (the last one).

* E2M1 holds ``±{0, 0.5, 1, 1.5, 2, 3, 4, 6}``. ``round_e2m1`` rounds to nearest, ties to the even mantissa
  (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), saturates beyond ±6 and keeps NaN.
  ``round_e2m1_stochastic`` rounds to one of the two neighbours with the probability that makes the mean
  exact (draws from the given generator: deterministic under a seed); for gradients only.
* Scales: an fp32 per-tensor encode scale ``S = 448 * 6 / amax(x)`` (1 for a zero or non-finite amax) and per
  block of 16 elements (1x16 along ``R``, or 16x16 for weights) a decode scale stored in E4M3,
  ``d = e4m3(amax_block / 6 * S)``. Elements are ``e2m1(x * (S / d))``; the value read back is
  ``q * d / S``, the per-tensor scale applied in fp32 (never folded into a low-precision factor). A block
  whose ``d`` is 0 reads 0; a non-finite block amax reads NaN.
* RHT: ``x`` is multiplied, in 16-element groups along ``R``, by ``Q = diag(signs) @ H16 / 4`` (``H16`` the
  Sylvester Hadamard matrix, ``signs`` random ±1): ``Q`` is orthogonal, so when both operands of a GEMM
  reducing over ``R`` get the same ``Q`` their product is unchanged, ``(a Q)(b Q)^T = a b^T``, while outliers
  are spread over the group before the coarse quantisation. ``R`` is zero-padded to a multiple of 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcore_precision.formats import E4M3, quantize
from mcore_precision.kernels import quantize_nvfp4

__all__ = [
    "E2M1_GRID",
    "E2M1_MAX",
    "NVFP4Tensor",
    "NVFP4_BLOCK",
    "hadamard",
    "nvfp4_quantize",
    "nvfp4_quantize_reference",
    "random_hadamard",
    "rht",
    "round_e2m1",
    "round_e2m1_stochastic",
]

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # index parity = mantissa parity
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
_FP32_MAX = float(torch.finfo(torch.float32).max)


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``|x|`` saturated to 6, the grid points below and above it and the lower one's index."""
    grid = torch.tensor(E2M1_GRID, device=x.device)
    ax = x.float().abs().clamp(max=E2M1_MAX)
    low = (torch.bucketize(ax, grid, right=True) - 1).clamp(0, len(E2M1_GRID) - 1)  # grid[low] <= |x|
    high = (low + 1).clamp(max=len(E2M1_GRID) - 1)
    return ax, grid[low], grid[high], low


def _signed(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    out = torch.where(x < 0, -magnitude, magnitude)
    return torch.where(torch.isnan(x), x.float(), out)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the E2M1 grid (nearest, ties to even mantissa, saturating at ±6), as fp32."""
    ax, lo, hi, low = _neighbours(x)
    up = (hi - ax < ax - lo) | ((hi - ax == ax - lo) & (low % 2 == 1))
    return _signed(x, torch.where(up, hi, lo))


def round_e2m1_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` rounded to one of its two E2M1 neighbours, up with probability ``(|x| - lo) / (hi - lo)`` (unbiased
    inside ``[-6, 6]``, saturating beyond), as fp32. ``generator`` lives on ``x``'s device."""
    ax, lo, hi, _ = _neighbours(x)
    u = torch.rand(x.shape, generator=generator, device=x.device)
    gap = hi - lo
    up = u * gap < ax - lo  # P(up) = (|x| - lo) / gap; never up on the grid or at 6
    return _signed(x, torch.where(up, hi, lo))


@dataclass(frozen=True, eq=False)
class NVFP4Tensor:
    """``data (M, R)``: E2M1 values as fp32; ``block_scale``: the E4M3 decode scales, one per ``block``;
    ``global_scale``: the fp32 per-tensor encode scale ``S`` (0-d)."""

    data: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor
    block: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        """``q * d / S`` in fp32."""
        return self.data * _expand(self.block_scale.float(), self.data.shape, self.block) / self.global_scale

    def t(self) -> NVFP4Tensor:
        """The transposed operand (same blocks, transposed): for 16x16 weight blocks."""
        return NVFP4Tensor(self.data.t(), self.block_scale.t(), self.global_scale, (self.block[1], self.block[0]))


def _expand(scales: torch.Tensor, shape: torch.Size | tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    full = scales.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[: shape[0], : shape[1]]


def _block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    (bm, bk), (m, k) = block, x.shape
    pad_m, pad_k = -m % bm, -k % bk
    a = torch.nn.functional.pad(x.detach().abs().float(), (0, pad_k, 0, pad_m))  # zeros add no amax
    return a.view((m + pad_m) // bm, bm, (k + pad_k) // bk, bk).amax(dim=(1, 3))  # (ceil(M/bm), ceil(K/bk))


def nvfp4_quantize(
    x: torch.Tensor, block: tuple[int, int] = (1, NVFP4_BLOCK), generator: torch.Generator | None = None
) -> NVFP4Tensor:
    """``x (M, R)`` to NVFP4 (module docstring): round to nearest, or stochastically with ``generator`` (the
    Triton kernel on CUDA, ``nvfp4_quantize_reference`` elsewhere: ``kernels``; the same draws either way)."""
    if x.dim() != 2:
        raise ValueError(f"nvfp4_quantize: x has shape {tuple(x.shape)}; allowed: a 2-D (M, R) tensor")
    data, decode_block, encode = quantize_nvfp4(x, block, generator)
    return NVFP4Tensor(data, decode_block, encode, block)


def nvfp4_quantize_reference(
    x: torch.Tensor, block: tuple[int, int] = (1, NVFP4_BLOCK), generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch reference of ``nvfp4_quantize``: ``(values (M, R) fp32, E4M3 block scales, tensor scale ())``."""
    amax = x.detach().abs().amax().float() if x.numel() else x.new_zeros((), dtype=torch.float32)
    usable = torch.isfinite(amax) & (amax > 0)
    encode = torch.where(usable, (E4M3.max * E2M1_MAX / torch.where(usable, amax, 1.0)).clamp(max=_FP32_MAX), 1.0)
    decode_block = quantize(_block_amax(x, block) / E2M1_MAX * encode, 1.0, E4M3)  # (blocks), e4m3
    d = decode_block.float()
    factor = torch.where(d == 0, torch.zeros_like(d), encode / d)  # per block, fp32
    scaled = x.float() * _expand(factor, x.shape, block)
    data = round_e2m1(scaled) if generator is None else round_e2m1_stochastic(scaled, generator)
    return data, decode_block, encode


def hadamard(n: int = NVFP4_BLOCK) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix (entries ±1; ``n`` a power of two), fp32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: n = {n}; allowed: a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(signs: torch.Tensor) -> torch.Tensor:
    """``Q = diag(signs) @ H / sqrt(n)`` for ±1 ``signs (n,)``: orthogonal (``Q @ Q.T = I``)."""
    n = signs.shape[0]
    return signs.float()[:, None] * hadamard(n).to(signs.device) / n**0.5


def rht(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x (M, R)`` times ``q (n, n)`` in ``n``-element groups along ``R`` (zero-padded to a multiple of ``n``)
    -> ``(M, R')``, fp32."""
    n = q.shape[0]
    m, r = x.shape
    padded = torch.nn.functional.pad(x.float(), (0, -r % n))  # (M, R')
    return (padded.view(m, -1, n) @ q).view(m, -1)  # (M, R'/n, n) @ (n, n)
