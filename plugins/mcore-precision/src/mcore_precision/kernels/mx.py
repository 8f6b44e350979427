"""MXFP8 quantisation in Triton: 1x32 blocks along the reduction dim with E8M0 scales, rounded up
(NVIDIA's rule) or floored (OCP's), row- or column-wise (a transposed view). It is the blockwise kernel
(``blockwise._blocks``) with the E8M0 scale rule; the torch reference is ``reference.quantize_mx``
(``mx.mx_quantize_reference``), which every byte and scale here equals.
"""

from __future__ import annotations

import torch

from mcore_precision.formats import FP8Format
from mcore_precision.kernels.blockwise import launch_blocks
from mcore_precision.mx import MX_BLOCK, Rounding

__all__ = ["quantize_mx"]

_RULES = {"up": 1, "floor": 2}


def quantize_mx(x: torch.Tensor, fmt: FP8Format, rounding: Rounding = "up") -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, R)`` -> ``(q (M, R), scale (M, ceil(R/32)))``, the scales ``2**k`` in fp32 (NaN: a block with a
    non-finite amax)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_mx: x has shape {tuple(x.shape)}; allowed: a 2-D (M, R) tensor")
    if rounding not in _RULES:
        raise ValueError(f"quantize_mx: rounding = {rounding!r}; allowed: 'up', 'floor'")
    return launch_blocks(x, fmt, (1, MX_BLOCK), rule=_RULES[rounding])
