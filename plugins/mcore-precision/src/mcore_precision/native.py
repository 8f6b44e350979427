"""The native FP8 GEMMs: torch's scaled-mm kernels, feature-detected per call, never pinned to a torch version.

``native_fp8_mm(a, b, out_dtype)`` answers ``dequantize(a) @ dequantize(b).T`` from the tensor cores, or
``None`` when this device, this torch or these shapes have no kernel for it (the caller then emulates):

* per-tensor and rowwise scales: ``torch._scaled_mm`` on CUDA cards with FP8 tensor cores (capability 8.9+),
  every dimension a multiple of 16; rowwise needs E4M3 operands and a bf16 output;
* 1x128 / 128x128 blocks (DeepSeek-V3): ``torch.nn.functional.scaled_mm`` with ``BlockWise1x128`` /
  ``BlockWise128x128`` scaling where the installed torch has it, on Hopper (capability 9.x), every
  dimension a multiple of 128.

The kernels take decode scales (``1 / scale``): an operand's ``decode`` where its quantisation kernel wrote it
(per-tensor scales), else one reciprocal. Scale layouts: 1x128 scales ``(M, K/128)`` stored M-major (torch's
scaled-mm tests), 128x128 scales as ``(K/128, P/128)``, the transpose of the row-major ``(P/128, K/128)``
(torch 2.11 refused the latter itself; the transposed form is untimed and unchecked on a card as of
2026-12-07: ``CheckedNative`` compares its first answer with the emulation and emulates on a disagreement).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mcore_precision.scaling import FP8Tensor

__all__ = ["native_fp8_mm", "native_scaled_mm_available"]


def native_scaled_mm_available(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` can run on ``device``: CUDA with FP8 tensor cores (capability 8.9+)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return _capability(device) >= (8, 9)


def _capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability, asked once: every quantised GEMM asks it (three times a linear), and
    ``torch.cuda.get_device_capability`` costs microseconds of host time each call. While ``torch.compile``
    traces, asked directly (dynamo folds it to a constant; it would only warn about the cache)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if torch.compiler.is_compiling():
        return torch.cuda.get_device_capability(index)
    return _cached_capability(index)


@functools.cache
def _cached_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _decode(q: FP8Tensor) -> torch.Tensor:
    """``1 / scale`` (fp32): the one the quantisation kernel wrote, else computed here."""
    return q.decode if q.decode is not None else q.scale.float().reciprocal()


def _blockwise_available(device: torch.device) -> bool:
    f = torch.nn.functional
    kinds = getattr(getattr(f, "ScalingType", None), "__members__", {})
    has = hasattr(f, "scaled_mm") and "BlockWise1x128" in kinds and "BlockWise128x128" in kinds
    if not has or device.type != "cuda":
        return False
    return _capability(device)[0] == 9


def native_fp8_mm(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype) -> torch.Tensor | None:
    """``a (M, K)`` times ``b (P, K)`` transposed, natively, or ``None`` (module docstring)."""
    if not native_scaled_mm_available(a.data.device):
        return None
    dims = (a.data.shape[0], a.data.shape[1], b.data.shape[0])
    if a.block is None and b.block is None:
        if a.data.dtype == b.data.dtype == torch.float8_e5m2 or any(d % 16 for d in dims):
            return None  # no E5M2 x E5M2 kernel
        return torch._scaled_mm(
            a.data.contiguous(),
            b.data.contiguous().t(),  # column-major b.T
            scale_a=_decode(a),
            scale_b=_decode(b),
            out_dtype=out_dtype,
        )
    if a.block is None or b.block is None:
        return None
    e4m3 = a.data.dtype == b.data.dtype == torch.float8_e4m3fn
    rowwise = a.block[0] == b.block[0] == 1 and a.scale.shape[1] == b.scale.shape[1] == 1
    if rowwise:
        if not e4m3 or out_dtype != torch.bfloat16 or any(d % 16 for d in dims):
            return None
        return torch._scaled_mm(
            a.data.contiguous(),
            b.data.contiguous().t(),
            scale_a=a.scale.float().reciprocal().contiguous(),  # (M, 1)
            scale_b=b.scale.float().reciprocal().reshape(1, -1).contiguous(),  # (1, P)
            out_dtype=out_dtype,
        )
    return _blockwise(a, b, out_dtype, dims)


def _blockwise(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype, dims: tuple[int, ...]) -> torch.Tensor | None:
    if not _blockwise_available(a.data.device) or any(d % 128 for d in dims) or a.block != (1, 128):
        return None
    if a.data.dtype != torch.float8_e4m3fn and b.data.dtype != torch.float8_e4m3fn:
        return None
    f = torch.nn.functional
    recipe_b = {(1, 128): f.ScalingType.BlockWise1x128, (128, 128): f.ScalingType.BlockWise128x128}.get(
        b.block or (0, 0)
    )
    if recipe_b is None or out_dtype != torch.bfloat16:
        return None
    if b.block == (128, 128) and b.scale.shape[1] % 4:
        return None  # the rows of the (P/128, K/128) grid below must be 16-byte aligned
    decode_a = a.scale.float().reciprocal().t().contiguous().t()  # (M, K/128), M-major
    decode_b = b.scale.float().reciprocal()
    if b.block == (1, 128):
        decode_b = decode_b.t().contiguous().t()  # (P, K/128), P-major
    else:  # 128 x 128: torch wants (K/128, P/128), the transpose of a row-major (P/128, K/128); it refused
        # (P/128, K/128) itself (H100, torch 2.11, 2026-12-05)
        decode_b = decode_b.contiguous().t()
    return f.scaled_mm(
        a.data.contiguous(),
        b.data.contiguous().t(),
        decode_a,
        f.ScalingType.BlockWise1x128,
        decode_b,
        recipe_b,
        output_dtype=out_dtype,
    )
