"""Scaling schemes: how the quantised linear (``fp8_linear``) quantises each operand of its three GEMMs.

Shape legend: N rows of the input, K input features, F output features. Every GEMM is ``a @ b.T`` with both
operands given as ``(rows, R)``, ``R`` the reduction dim:

* fprop ``y = x @ w.T``: ``x (N, K)``, ``w (F, K)``;
* dgrad ``dx = g @ w``: ``g (N, F)``, ``w.T (K, F)``;
* wgrad ``dw = g.T @ x``: ``g.T (F, N)``, ``x.T (K, N)``.

A scheme's ``quantize(t, operand, gemm)`` answers the quantised ``t`` for that GEMM, its scales running along
``R``; an operand named in ``reuse`` is quantised once, in fprop (or dgrad, for the gradient), and its
transpose serves the other GEMM (per-tensor scales, and 128x128 / 16x16 weight blocks, are the same either
way); the others are quantised again from the high-precision tensor in the other layout (as torchao does for
rowwise scales). The schemes:

* ``TensorScheme``: one scale per tensor from a ``Scaler`` (current amax, or an amax history);
* ``RowwiseScheme``: one scale per row of each operand (per input/gradient row and weight output row in
  fprop; per column, i.e. per row of the transposed operand, in the backward GEMMs);
* ``BlockwiseScheme`` (DeepSeek-V3): 1x128 tiles along ``R`` for inputs and gradients (in wgrad, tiles of
  128 rows of ``x``/``g``), 128x128 blocks for weights;
* ``MXScheme``: MXFP8 1x32 blocks along ``R`` with E8M0 scales for every operand (``mx``);
* ``NVFP4Scheme``: NVFP4 1x16 blocks along ``R`` (16x16 for weights) with E4M3 block scales and an fp32
  tensor scale (``nvfp4``); the wgrad operands get the random Hadamard transform, gradients stochastic rounding.

The quantise step runs through ``kernels`` (Triton on CUDA, the torch reference of ``formats`` / ``mx`` /
``nvfp4`` elsewhere: the same bytes and scales either way). Edge blocks that ``R`` or the rows do not fill
are padded (they take the amax of the elements they have, the same as zero padding), on every path: no shape
is refused. ``gemm`` runs the product natively where the
device, torch and the shapes allow it (``native``), and else emulates it: the operands dequantised exactly
to fp32 and multiplied in fp32 (format-exact operands; the accumulation differs from the hardware's).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from mcore_precision import kernels
from mcore_precision.formats import E4M3, FP8Format, dequantize, expand_block_scales
from mcore_precision.mx import Rounding, mx_quantize
from mcore_precision.native import native_fp8_mm, native_scaled_mm_available
from mcore_precision.nvfp4 import NVFP4_BLOCK, nvfp4_quantize, random_hadamard, rht

__all__ = [
    "BlockwiseScheme",
    "CheckedNative",
    "FP8Tensor",
    "FusedScaler",
    "Gemm",
    "MXScheme",
    "NVFP4Scheme",
    "Operand",
    "Quantized",
    "RowwiseScheme",
    "Scaler",
    "Scheme",
    "TensorScheme",
    "Transposable",
]

Operand = Literal["input", "weight", "grad"]
Gemm = Literal["fprop", "dgrad", "wgrad"]


class Quantized(Protocol):
    """A quantised GEMM operand ``(M, R)``: it reads back exactly as ``dequantize()`` (fp32)."""

    def dequantize(self) -> torch.Tensor: ...


class Transposable(Quantized, Protocol):
    """A quantised operand whose transpose is the same quantisation of the transposed tensor (per-tensor scales,
    square weight blocks): what a scheme's ``reuse`` operands answer."""

    def t(self) -> Transposable: ...


class Scaler(Protocol):
    """Answers the per-tensor scale to quantise a tensor with (recording its amax where it keeps a history)."""

    fmt: FP8Format

    def scale(self, x: torch.Tensor) -> torch.Tensor: ...


class FusedScaler(Scaler, Protocol):
    """A ``Scaler`` that also quantises in one go: ``(q, q.T or None, scale, 1 / scale)`` of ``x`` in its
    format, its amax recorded as ``scale`` would record it. ``TensorScheme`` uses it where a scaler has it (the
    fused kernels of ``kernels.quantize_tensorwise``)."""

    def quantize(
        self, x: torch.Tensor, transpose: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]: ...


class Scheme(Protocol):
    """How the quantised linear quantises its operands and multiplies them (module docstring)."""

    reuse: frozenset[str]

    def quantize(self, t: torch.Tensor, operand: Operand, gemm: Gemm) -> Quantized: ...

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor: ...

    def describe(self) -> str: ...


@dataclass(frozen=True, eq=False)
class FP8Tensor:
    """``data (M, R)`` fp8 codes with ``scale``: 0-d (``block`` ``None``) or one per ``block``, in the grid
    ``(ceil(M/bm), ceil(R/br))``; the value read back is ``q / scale`` in fp32. ``data_t``, when present, is
    ``data.T`` stored row-major (written by the same kernel): ``t()`` answers it, so a native GEMM wanting the
    transposed layout copies nothing. ``decode``, when present, is ``1 / scale`` (fp32, written by the
    quantisation kernel): what the native GEMM takes, so it launches nothing to compute it."""

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None
    data_t: torch.Tensor | None = None
    decode: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.data, self.expanded_scale())

    def expanded_scale(self) -> torch.Tensor:
        """The scale broadcastable against ``data``: 0-d, per row ``(M, 1)``, or per element."""
        if self.block is None or (self.block[0] == 1 and self.scale.shape[-1] == 1):
            return self.scale
        return expand_block_scales(self.scale, (self.data.shape[0], self.data.shape[1]), self.block)

    def t(self) -> FP8Tensor:
        data, data_t = (self.data.t(), None) if self.data_t is None else (self.data_t, self.data)
        if self.block is None:
            return FP8Tensor(data, self.scale, None, data_t, self.decode)
        decode = None if self.decode is None else self.decode.t()
        return FP8Tensor(data, self.scale.t(), (self.block[1], self.block[0]), data_t, decode)


def _emulated(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    return (a.dequantize() @ b.dequantize().t()).to(out_dtype)


def _fp8_gemm(a: Quantized, b: Quantized, out_dtype: torch.dtype, native: bool) -> torch.Tensor:
    if native and isinstance(a, FP8Tensor) and isinstance(b, FP8Tensor):
        out = native_fp8_mm(a, b, out_dtype)
        if out is not None:
            return out
    return _emulated(a, b, out_dtype)


def _kind(q: FP8Tensor) -> Any:
    """What the kernel sees of the scales: per tensor, per row, or the block shape."""
    if q.block is None:
        return "tensor"
    return "row" if q.block[0] == 1 and q.scale.shape[-1] == 1 else q.block


class CheckedNative:
    """A scheme's native GEMM, trusted only once checked: the first native answer for each kind of operand pair
    (their block shapes and dtypes) is compared with the emulation; on a disagreement (a kernel whose scale
    layout or semantics differ from ours) or an error it warns and that pair is emulated from then on. One per
    linear (no global state); the check costs one emulated GEMM per pair, once."""

    def __init__(self, recipe: str, native: bool) -> None:
        self.recipe, self.native = recipe, native
        self.trusted: dict[tuple[Any, ...], bool] = {}

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
        if not (self.native and isinstance(a, FP8Tensor) and isinstance(b, FP8Tensor)):
            return _emulated(a, b, out_dtype)
        key = (_kind(a), _kind(b), a.data.dtype, b.data.dtype)
        trusted = self.trusted.get(key)
        if trusted is False:
            return _emulated(a, b, out_dtype)
        try:
            out = native_fp8_mm(a, b, out_dtype)
        except (RuntimeError, ValueError) as exc:  # torch checks scale layouts with ValueError
            if trusted:
                raise
            return self._distrust(key, a, b, out_dtype, f"failed ({exc})")
        if out is None:
            return _emulated(a, b, out_dtype)
        if trusted is None:
            want = _emulated(a, b, torch.float32)
            if not float((out.float() - want).norm()) <= 1e-2 * float(want.norm()):
                return self._distrust(key, a, b, out_dtype, "disagrees with the emulation")
            self.trusted[key] = True
        return out

    def _distrust(
        self, key: tuple[Any, ...], a: Quantized, b: Quantized, out_dtype: torch.dtype, why: str
    ) -> torch.Tensor:
        warnings.warn(f"{self.recipe}: torch's scaled GEMM for blocks {key[:2]} {why}; emulated", stacklevel=4)
        self.trusted[key] = False
        return _emulated(a, b, out_dtype)


class TensorScheme:
    """Per-tensor scales from one ``Scaler`` per operand; every quantised copy serves both layouts."""

    reuse = frozenset({"input", "weight", "grad"})

    def __init__(self, *, input: Scaler, weight: Scaler, grad: Scaler, native: bool = True) -> None:
        if (
            input.fmt is not E4M3
            or weight.fmt is not E4M3
            or grad.fmt.dtype
            not in (
                torch.float8_e4m3fn,
                torch.float8_e5m2,
            )
        ):
            raise ValueError("TensorScheme: input and weight must be E4M3, the gradient E4M3 or E5M2")
        self.scalers = {"input": input, "weight": weight, "grad": grad}
        self.native = native

    def quantize(self, t: torch.Tensor, operand: Operand, gemm: Gemm) -> FP8Tensor:
        """Both layouts at once where the native GEMM will want the transposed one (CUDA)."""
        scaler = self.scalers[operand]
        transpose = self.native and native_scaled_mm_available(t.device)
        fused = getattr(scaler, "quantize", None)
        if fused is not None:
            q, q_t, s, decode = fused(t, transpose)
        else:
            s = scaler.scale(t)
            q, q_t, _, _, decode = kernels.quantize_tensorwise(t, scaler.fmt, scale=s, transpose=transpose)
        return FP8Tensor(q, s, None, q_t, decode)

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
        return _fp8_gemm(a, b, out_dtype, self.native)

    def describe(self) -> str:
        s = self.scalers
        return f"fp8 per tensor: input {s['input'].fmt.name}, weight {s['weight'].fmt.name}, grad {s['grad'].fmt.name}"


class RowwiseScheme:
    """One scale per row of each operand along the reduction dim; the backward layouts quantised afresh."""

    reuse: frozenset[str] = frozenset()

    def __init__(self, grad_fmt: FP8Format, margin: int = 0, native: bool = True) -> None:
        self.fmts = {"input": E4M3, "weight": E4M3, "grad": grad_fmt}
        self.margin, self.native = margin, native
        self.checked = CheckedNative("fp8-rowwise", native)

    def quantize(self, t: torch.Tensor, operand: Operand, gemm: Gemm) -> FP8Tensor:
        q, s = kernels.quantize_rowwise(t, self.fmts[operand], self.margin)  # (M, R), (M, 1)
        return FP8Tensor(q, s, (1, max(t.shape[1], 1)))

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
        return self.checked.gemm(a, b, out_dtype)

    def describe(self) -> str:
        return f"fp8 rowwise: input e4m3, weight e4m3, grad {self.fmts['grad'].name}"


class BlockwiseScheme:
    """DeepSeek-V3 blocks: 1x``tile`` for inputs and gradients along the reduction dim, ``tile`` x ``tile``
    for weights (whose quantised copy serves dgrad transposed)."""

    reuse = frozenset({"weight"})

    def __init__(self, grad_fmt: FP8Format, margin: int = 0, native: bool = True, tile: int = 128) -> None:
        self.fmts = {"input": E4M3, "weight": E4M3, "grad": grad_fmt}
        self.margin, self.native, self.tile = margin, native, tile
        self.checked = CheckedNative("fp8-blockwise", native)

    def quantize(self, t: torch.Tensor, operand: Operand, gemm: Gemm) -> FP8Tensor:
        block = (self.tile, self.tile) if operand == "weight" else (1, self.tile)
        q, s = kernels.quantize_blockwise(t, self.fmts[operand], block, self.margin)  # (M, R), block grid
        return FP8Tensor(q, s, block)

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
        return self.checked.gemm(a, b, out_dtype)

    def describe(self) -> str:
        t = self.tile
        return f"fp8 blockwise: input 1x{t} e4m3, weight {t}x{t} e4m3, grad 1x{t} {self.fmts['grad'].name}"


class MXScheme:
    """MXFP8: 1x32 blocks along the reduction dim, E8M0 scales, for every operand of every GEMM (row- and
    column-wise copies: each layout quantised from the high-precision tensor)."""

    reuse: frozenset[str] = frozenset()

    def __init__(self, grad_fmt: FP8Format, rounding: Rounding = "up") -> None:
        self.fmts = {"input": E4M3, "weight": E4M3, "grad": grad_fmt}
        self.rounding: Rounding = rounding

    def quantize(self, t: torch.Tensor, operand: Operand, gemm: Gemm) -> Quantized:
        return mx_quantize(t, self.fmts[operand], self.rounding)

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
        return _emulated(a, b, out_dtype)

    def describe(self) -> str:
        return f"mxfp8 1x32 e8m0 (scales rounded {self.rounding}): grad {self.fmts['grad'].name}"


class NVFP4Scheme:
    """NVFP4: 1x16 blocks (16x16 for weights, whose copy serves dgrad transposed), the random Hadamard
    transform on both wgrad operands (the same ``signs``), stochastic rounding of gradients drawn from
    ``seed`` (deterministic under it)."""

    reuse = frozenset({"weight"})

    def __init__(self, *, seed: int, hadamard: bool = True, stochastic: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.signs = torch.randint(0, 2, (NVFP4_BLOCK,), generator=g).float() * 2 - 1  # (16,) of ±1
        self.seed, self.hadamard, self.stochastic = seed, hadamard, stochastic
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending: torch.Tensor | None = None  # a loaded generator state, for the first generator made

    def generator(self, device: torch.device) -> torch.Generator:
        """The stochastic-rounding generator on ``device`` (seeded from ``seed + 1``, or the loaded state)."""
        if device not in self._generators:
            g = torch.Generator(device=device).manual_seed(self.seed + 1)
            if self._pending is not None:
                g.set_state(self._pending)
                self._pending = None
            self._generators[device] = g
        return self._generators[device]

    def rng_state(self) -> torch.Tensor | None:
        """Where the draws stand (the generator's state, a uint8 tensor), or ``None`` before the first draw."""
        if not self._generators:
            return self._pending
        return next(iter(self._generators.values())).get_state()

    def load_rng_state(self, state: torch.Tensor) -> None:
        """Continue the draws from ``state`` (``rng_state`` of a scheme drawing on the same device type)."""
        state = torch.as_tensor(state, dtype=torch.uint8).cpu()
        if self._generators:
            next(iter(self._generators.values())).set_state(state)
        else:
            self._pending = state

    def quantize(self, t: torch.Tensor, operand: Operand, gemm: Gemm) -> Quantized:
        if operand == "weight":
            return nvfp4_quantize(t, (NVFP4_BLOCK, NVFP4_BLOCK))
        if gemm == "wgrad" and self.hadamard:
            t = rht(t, random_hadamard(self.signs.to(t.device)))  # (M, R') both operands alike: product kept
        generator = self.generator(t.device) if operand == "grad" and self.stochastic else None
        return nvfp4_quantize(t, (1, NVFP4_BLOCK), generator)

    def gemm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
        return _emulated(a, b, out_dtype)

    def describe(self) -> str:
        return f"nvfp4 e2m1 1x16/16x16 e4m3 scales, rht {self.hadamard}, stochastic grads {self.stochastic}"
