"""Triton helpers every quantisation kernel shares: FP8 codes, scales from an amax, E8M0 exponents.

Imported only where Triton is (the dispatch in ``kernels/__init__`` imports nothing of Triton on CPU). Each
helper computes bit for bit what the torch reference (``formats``, ``mx``) computes, in integer arithmetic
where the reference relies on a rounding rule (the interpreter's FP8 conversions are not trusted; compiled on a
card with FP8 conversions, ``fp8_code`` could use the card's, ``HW_CVT_ON_CUDA``, off: it miscompiled):

* ``fp8_code``: the byte of ``formats.quantize``'s result for an already scaled fp32 ``y``: finite values
  saturate to ``±fmax`` and round to nearest even (subnormals included); NaN stays NaN; ``±inf`` stays
  ``±inf`` in E5M2 and becomes NaN in E4M3.
* ``scale_from_amax``: ``formats.amax_to_scale`` (IEEE division, ``div_rn``, in torch's order).
* ``e8m0_exponent`` / ``pow2``: ``mx.e8m0_exponents`` and the exact power of two ``2**k``.
* ``abs_bits``: ``|x|`` as int32 bits; their max is the bits of the amax, with NaN above every number (the
  reference's ``amax`` propagates NaN), so reductions never depend on how a max treats NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_precision.formats import FP8Format

__all__ = [
    "HW_CVT_ON_CUDA",
    "abs_bits",
    "e8m0_exponent",
    "emax",
    "fmt_args",
    "fp8_code",
    "pow2",
    "scale_from_amax",
    "to_f32",
]

HW_CVT_ON_CUDA = False
"""Whether ``fp8_code`` rounds with the card's conversion (``cvt.rn.satfinite``, capability 8.9+) instead of the
integer emulation. Off: on an H100 and an H200 (torch 2.11, Triton 3.6, 2026-12-06) the compiled conversion wrote
wrong bytes for whole 128-column groups whenever the input tile was read column-major (a transposed view:
per-tensor casts of ``x.t()`` and MXFP8 of fp32 ``x.t()``), while every contiguous case matched; with the
emulation all of ``test_kernels_gpu`` (62 cases, H100) equals the references byte for byte. ``True`` brings the
conversion back for a Triton that compiles it right (``test_kernels_gpu`` decides)."""


def fmt_args(fmt: FP8Format, device: torch.device) -> dict[str, object]:
    """The constexpr arguments ``fp8_code`` takes for ``fmt`` on ``device``: max, mantissa bits, exponent bias,
    whether it has inf, and whether to convert with the hardware instruction (compiled on CUDA)."""
    if fmt.name not in ("e4m3", "e5m2"):
        raise ValueError(f"quantisation kernels: format {fmt.name!r}; allowed: 'e4m3', 'e5m2'")
    e4m3 = fmt.name == "e4m3"
    return {
        "FMAX": fmt.max,
        "MANT": 3 if e4m3 else 2,
        "BIAS": 7 if e4m3 else 15,
        "HAS_INF": not e4m3,
        "HW_CVT": HW_CVT_ON_CUDA and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9),
    }


def emax(fmt: FP8Format) -> int:
    """The exponent of ``fmt``'s largest binade (8 for E4M3, 15 for E5M2): ``mx``'s ``emax``."""
    return 8 if fmt.name == "e4m3" else 15


@triton.jit
def to_f32(x):
    """``x`` as fp32, exactly: bf16 by its bits (Triton's interpreter flushes or garbles bf16 subnormals)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def abs_bits(x):
    """``|x|`` (any float dtype) as the int32 bits of its fp32 value: ordered as the magnitudes, NaN largest."""
    return to_f32(x).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def fp8_code(
    y, FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, HAS_INF: tl.constexpr, HW_CVT: tl.constexpr
):
    """The FP8 byte (uint8) of fp32 ``y`` (module docstring); ``HW_CVT``: the card's conversion rounds."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    if HW_CVT:
        clamped = tl.minimum(tl.maximum(y, -FMAX), FMAX)  # finite values saturated; specials set below
        if HAS_INF:
            code = clamped.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True).to(tl.int32)
        else:
            code = clamped.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        code = _fp8_code_int(mag, sign, FMAX, MANT, BIAS)
    if HAS_INF:
        inf_code = 0x7C | sign
    else:
        inf_code = 0x7F  # the reference turns inf into a fresh (positive) NaN
    code = tl.where(mag == 0x7F800000, inf_code, code)
    code = tl.where(mag > 0x7F800000, 0x7F | sign, code)
    return code.to(tl.uint8)


@triton.jit
def _fp8_code_int(mag, sign, FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr):
    """The FP8 code (int32) of a finite value with magnitude bits ``mag`` and ``sign`` (0 or 0x80), in integer
    arithmetic: saturated, rounded to nearest even, subnormals included."""
    a = tl.minimum(mag.to(tl.float32, bitcast=True), FMAX).to(tl.int32, bitcast=True)  # saturated |y| (finite)
    e = a >> 23
    # normal range: add the half ulp (less one, plus the kept bit's parity: ties to even), drop the low bits
    odd = (a >> (23 - MANT)) & 1
    normal = (a + (((BIAS - 127) << 23) + (1 << (22 - MANT)) - 1) + odd) >> (23 - MANT)
    # subnormal range: |y| / 2**(1 - BIAS - MANT) rounded to the nearest even integer
    sig = tl.where(e > 0, (a & 0x7FFFFF) | 0x800000, a & 0x7FFFFF)
    shift = tl.minimum(tl.maximum((151 - BIAS - MANT) - tl.maximum(e, 1), 1), 31)
    q = sig >> shift
    rem = sig - (q << shift)
    half = 1 << (shift - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    return tl.where(e >= 128 - BIAS, normal, q + up.to(tl.int32)) | sign


@triton.jit
def scale_from_amax(amax, FMAX: tl.constexpr, MARGIN_DIV: tl.constexpr):
    """``fmax / amax / 2**margin`` in fp32 (``MARGIN_DIV = 2**margin``); 1 for a zero or non-finite amax; at
    most fp32's max."""
    usable = (amax > 0) & (amax < float("inf"))  # False for NaN
    safe = tl.where(usable, amax, 1.0)
    # torch evaluates ``fmax / amax`` as ``amax.reciprocal() * fmax``: two roundings, kept here
    s = tl.math.div_rn(tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe) * FMAX, MARGIN_DIV)
    s = tl.minimum(s, 3.4028234663852886e38)
    return tl.where(usable, s, 1.0)


@triton.jit
def e8m0_exponent(amax_bits, EMAX: tl.constexpr, UP: tl.constexpr):
    """The E8M0 exponent ``k`` (int32 in ``[-127, 127]``) of a block whose amax has the bits ``amax_bits``, and
    whether the amax is finite: ``floor(log2(amax)) - emax``, one more with ``UP`` where ``amax / 2**k`` would
    exceed ``fmax``; 0 for a zero amax."""
    e = amax_bits >> 23
    k = e - 127 - EMAX
    if UP:
        # amax / 2**k = 1.m * 2**emax > fmax = 1.75 * 2**emax (E4M3 and E5M2 alike)  <=>  the mantissa bits
        # exceed 0.75 * 2**23 (a subnormal amax has k <= -127 either way)
        k = tl.where((amax_bits & 0x7FFFFF) > 0x600000, k + 1, k)
    k = tl.minimum(tl.maximum(k, -127), 127)
    k = tl.where(amax_bits == 0, 0, k)
    return k, e < 255


@triton.jit
def pow2(k):
    """``2**k`` in fp32, exact, for int32 ``k`` in ``[-127, 127]`` (``2**-127`` is subnormal)."""
    normal = ((k + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(k >= -126, normal, tl.full(k.shape, 0x00400000, tl.int32).to(tl.float32, bitcast=True))
