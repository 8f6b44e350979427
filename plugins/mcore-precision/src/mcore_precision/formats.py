"""FP8 number formats and their scales: the torch reference every recipe and kernel is checked against.

Runs anywhere torch's float8 dtypes exist (CPU included). Shape legend: M rows, K columns.

* Formats: ``E4M3`` (``torch.float8_e4m3fn``: max 448, no infinities, NaN) for weights and activations;
  ``E5M2`` (``torch.float8_e5m2``: max 57344, infinities) for gradients.
* Quantisation: ``q = fp8(x * scale)``, round to nearest, ties to even (torch's cast); finite values
  beyond the format's range saturate to ``±max``; NaN stays NaN; ``±inf`` stays ``±inf`` in E5M2 and
  becomes NaN in E4M3 (which has no infinity): a non-finite value is never hidden as a finite one, so
  the finiteness check of the step still sees it. Dequantisation: ``q / scale`` in fp32.
* Scales: ``scale = fmax / amax / 2**margin`` (``amax_to_scale``), per tensor, per row, or per block
  (1x128 activation/gradient tiles, 128x128 weight blocks: DeepSeek-V3). An ``amax`` of 0 or a
  non-finite one gives scale 1 (nothing to fit, or nothing sensible to fit to), and a scale is at most
  fp32's max (an ``amax`` in the subnormals).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "E4M3",
    "E5M2",
    "FORMATS",
    "FP8Format",
    "amax_to_scale",
    "blockwise_scales",
    "dequantize",
    "expand_block_scales",
    "quantize",
    "rowwise_scales",
    "tensorwise_scale",
]


@dataclass(frozen=True, slots=True)
class FP8Format:
    """``name`` (``"e4m3"``/``"e5m2"``), the torch ``dtype`` and the largest finite value ``max``."""

    name: str
    dtype: torch.dtype
    max: float

    @property
    def has_inf(self) -> bool:
        return self.dtype == torch.float8_e5m2


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, float(torch.finfo(torch.float8_e4m3fn).max))
E5M2 = FP8Format("e5m2", torch.float8_e5m2, float(torch.finfo(torch.float8_e5m2).max))
FORMATS: dict[str, FP8Format] = {"e4m3": E4M3, "e5m2": E5M2}

_FP32_MAX = float(torch.finfo(torch.float32).max)


def amax_to_scale(amax: torch.Tensor, fmt: FP8Format, margin: int = 0) -> torch.Tensor:
    """``fmax / amax / 2**margin`` in fp32, elementwise; 1 where ``amax`` is 0 or not finite; at most fp32's max."""
    amax = amax.float()
    usable = torch.isfinite(amax) & (amax > 0)
    scale = (fmt.max / torch.where(usable, amax, 1.0)) / (2.0**margin)
    return torch.where(usable, scale.clamp(max=_FP32_MAX), torch.ones_like(scale))


def tensorwise_scale(x: torch.Tensor, fmt: FP8Format, margin: int = 0) -> torch.Tensor:
    """One fp32 scale (0-d) for the whole tensor, from its current amax (an empty tensor: scale 1)."""
    return amax_to_scale(x.detach().abs().amax() if x.numel() else x.new_zeros(()), fmt, margin)


def rowwise_scales(x: torch.Tensor, fmt: FP8Format, margin: int = 0) -> torch.Tensor:
    """One scale per row of ``x (..., K)``: shape ``(..., 1)``."""
    return amax_to_scale(x.detach().abs().amax(dim=-1, keepdim=True), fmt, margin)


def _block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    bm, bk = block
    m, k = x.shape
    pad_m, pad_k = -m % bm, -k % bk
    a = torch.nn.functional.pad(x.detach().abs().float(), (0, pad_k, 0, pad_m))  # (M', K'); zeros add no amax
    return a.view((m + pad_m) // bm, bm, (k + pad_k) // bk, bk).amax(dim=(1, 3))  # (ceil(M/bm), ceil(K/bk))


def blockwise_scales(
    x: torch.Tensor, fmt: FP8Format, block: tuple[int, int] = (1, 128), margin: int = 0
) -> torch.Tensor:
    """One scale per ``block`` of a 2-D ``x (M, K)``: ``(1, 128)`` activation/gradient tiles or ``(128, 128)``
    weight blocks; ragged edge blocks take the amax of the elements they have. Shape ``(ceil(M/bm), ceil(K/bk))``."""
    if x.dim() != 2:
        raise ValueError(f"blockwise_scales: x has shape {tuple(x.shape)}; allowed: a 2-D (M, K) tensor")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"blockwise_scales: block = {block!r}; allowed: two positive ints (rows, columns)")
    return amax_to_scale(_block_amax(x, block), fmt, margin)


def expand_block_scales(scales: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Block scales ``(ceil(M/bm), ceil(K/bk))`` repeated to one per element of an ``(M, K)`` tensor."""
    bm, bk = block
    full = scales.repeat_interleave(bm, dim=0).repeat_interleave(bk, dim=1)  # (M', K')
    return full[: shape[0], : shape[1]]


def quantize(x: torch.Tensor, scale: torch.Tensor | float, fmt: FP8Format) -> torch.Tensor:
    """``fp8(x * scale)`` with saturation (module docstring); ``scale`` broadcasts against ``x`` (0-d, per row
    ``(..., 1)``, or per element from ``expand_block_scales``)."""
    y = x.float() * scale
    finite = torch.isfinite(y)
    y = torch.where(finite, y.clamp(-fmt.max, fmt.max), y)
    if not fmt.has_inf:
        y = torch.where(torch.isinf(y), torch.full_like(y, float("nan")), y)
    return y.to(fmt.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q / scale`` computed in fp32, returned as ``dtype``."""
    return (q.float() / scale).to(dtype)
