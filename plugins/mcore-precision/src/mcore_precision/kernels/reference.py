"""The torch references of the quantisation kernels, with the kernels' signatures: what runs off CUDA (or
without Triton), and the oracle the kernels are tested against, byte for byte.

Each one is built from the format modules (``formats``, ``mx``, ``nvfp4``) and changes nothing of them:

* ``quantize_tensorwise(x, fmt, margin, scale, transpose)``: ``(q, q.T or None, scale, amax, 1 / scale)``;
  with ``scale=None`` the scale comes from ``x``'s own amax (current scaling), else ``x`` is cast with the
  given one and its amax is answered for the history (delayed scaling); ``1 / scale`` is the decode scale the
  native GEMM takes;
* ``quantize_rowwise(x, fmt, margin)``: ``(q, scale (M, 1))``, one scale per row;
* ``quantize_blockwise(x, fmt, block, margin)``: ``(q, scale (ceil(M/bm), ceil(R/br)))``;
* ``quantize_mx(x, fmt, rounding)``: ``(q, scale (M, ceil(R/32)))``, the scales ``2**k`` in fp32;
* ``quantize_nvfp4(x, block, generator)``: ``(values fp32, E4M3 block scales, fp32 tensor scale ())``,
  stochastic rounding when a ``generator`` is given.

``x`` is 2-D with any strides (a transposed view quantises the column-wise copy); ``q`` is contiguous.
"""

from __future__ import annotations

import torch

from mcore_precision.formats import (
    FP8Format,
    amax_to_scale,
    blockwise_scales,
    expand_block_scales,
    quantize,
    rowwise_scales,
)
from mcore_precision.mx import Rounding, mx_quantize_reference
from mcore_precision.nvfp4 import nvfp4_quantize_reference

__all__ = ["quantize_blockwise", "quantize_mx", "quantize_nvfp4", "quantize_rowwise", "quantize_tensorwise"]


def _two_d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: x has shape {tuple(x.shape)}; allowed: a 2-D (M, R) tensor")


def quantize_tensorwise(
    x: torch.Tensor, fmt: FP8Format, margin: int = 0, scale: torch.Tensor | None = None, transpose: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (M, K)`` -> ``(q (M, K), q.T (K, M) or None, scale (), amax (), 1 / scale ())`` (module docstring)."""
    _two_d("quantize_tensorwise", x)
    amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    if scale is None:
        scale = amax_to_scale(amax, fmt, margin)
    scale = scale.to(device=x.device, dtype=torch.float32).reshape(())
    q = quantize(x, scale, fmt)
    return q, q.t().contiguous() if transpose else None, scale, amax, scale.reciprocal()


def quantize_rowwise(x: torch.Tensor, fmt: FP8Format, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, R)`` -> ``(q (M, R), scale (M, 1))``: ``formats.rowwise_scales`` and ``quantize``."""
    _two_d("quantize_rowwise", x)
    scale = rowwise_scales(x, fmt, margin)  # (M, 1)
    return quantize(x, scale, fmt), scale


def quantize_blockwise(
    x: torch.Tensor, fmt: FP8Format, block: tuple[int, int] = (1, 128), margin: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, R)`` -> ``(q (M, R), scale (ceil(M/bm), ceil(R/br)))``: ``formats.blockwise_scales``."""
    scale = blockwise_scales(x, fmt, block, margin)
    return quantize(x, expand_block_scales(scale, (x.shape[0], x.shape[1]), block), fmt), scale


def quantize_mx(x: torch.Tensor, fmt: FP8Format, rounding: Rounding = "up") -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, R)`` -> ``(q (M, R), scale (M, ceil(R/32)))``: ``mx.mx_quantize``'s codes and ``2**k`` scales."""
    _two_d("quantize_mx", x)
    return mx_quantize_reference(x, fmt, rounding)


def quantize_nvfp4(
    x: torch.Tensor, block: tuple[int, int] = (1, 16), generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (M, R)`` -> ``(values (M, R), block scales, tensor scale ())``: ``nvfp4.nvfp4_quantize_reference``."""
    _two_d("quantize_nvfp4", x)
    return nvfp4_quantize_reference(x, block, generator)
