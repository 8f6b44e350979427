"""The FP8 linear the ``fp8-*`` recipes put in place of a model's matrix ``nn.Linear``s, and its GEMM.

Shape legend: N rows of the input (batch and sequence flattened), K input features, F output features.

Forward: the input ``(N, K)`` and the weight ``(F, K)`` are quantised to E4M3 with per-tensor scales
(each from its ``Scaler``: current amax, or an amax history) and multiplied, ``y = x_q @ w_q.T``.
Backward: the output gradient ``(N, F)`` is quantised to the gradient format (E5M2 or E4M3) and both
gradient GEMMs reuse the saved quantised operands: ``dx = g_q @ w_q``, ``dw = g_q.T @ x_q`` (only the
fp8 copies of ``x`` and ``w`` are kept for backward). The bias, when there is one, stays in high precision.

The GEMM (``scaled_gemm``) runs natively through ``torch._scaled_mm`` (fp8 operands, fp32 accumulation)
on CUDA cards with FP8 tensor cores when the shapes allow it, and is emulated elsewhere: the same fp8
operands dequantised to fp32 and multiplied in fp32 (format-exact operands, accumulation unlike the
hardware's). The module keeps the original linear's parameters (same objects, same names), so
declarations, optimizers and checkpoints see the model unchanged; it is an ``nn.Linear`` subclass, so
``isinstance`` checks of layouts still hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from mcore.errors import UserError
from mcore_precision.formats import E4M3, E5M2, FP8Format, dequantize, quantize

__all__ = ["FP8Linear", "Scaler", "native_scaled_mm_available", "scaled_gemm"]


class Scaler(Protocol):
    """Answers the per-tensor scale to quantise a tensor with (recording its amax where it keeps a history)."""

    fmt: FP8Format

    def scale(self, x: torch.Tensor) -> torch.Tensor: ...


def native_scaled_mm_available(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` can run on ``device``: CUDA with FP8 tensor cores (capability 8.9+)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _native_shapes(a: torch.Tensor, b: torch.Tensor) -> bool:
    both_e5m2 = a.dtype == b.dtype == torch.float8_e5m2  # no E5M2 x E5M2 fp8 GEMM
    return not both_e5m2 and all(d % 16 == 0 for d in (*a.shape, b.shape[0]))


def scaled_gemm(
    a: torch.Tensor,
    scale_a: torch.Tensor,
    b: torch.Tensor,
    scale_b: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    native: bool,
) -> torch.Tensor:
    """``dequantize(a) @ dequantize(b).T`` for fp8 ``a (M, K)`` and ``b (P, K)`` with their scales -> ``(M, P)``
    as ``out_dtype``: native (``torch._scaled_mm``) when ``native`` and the card and shapes allow, else emulated."""
    if native and native_scaled_mm_available(a.device) and _native_shapes(a, b):
        # _scaled_mm multiplies a row-major a by a column-major b.T and applies the dequantisation scales
        return torch._scaled_mm(
            a.contiguous(),
            b.contiguous().t(),
            scale_a=scale_a.float().reciprocal(),
            scale_b=scale_b.float().reciprocal(),
            out_dtype=out_dtype,
        )
    return (dequantize(a, scale_a) @ dequantize(b, scale_b).t()).to(out_dtype)


@dataclass(frozen=True, eq=False)
class _Scalers:
    input: Scaler
    weight: Scaler
    grad: Scaler
    native: bool


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scalers: _Scalers
    ) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # (N, K)
        sx, sw = scalers.input.scale(x2), scalers.weight.scale(weight)
        qx, qw = quantize(x2, sx, scalers.input.fmt), quantize(weight, sw, scalers.weight.fmt)
        out = scaled_gemm(qx, sx, qw, sw, out_dtype=x.dtype, native=scalers.native)  # (N, F)
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.save_for_backward(qx, sx, qw, sw)
        ctx.scalers, ctx.lead = scalers, lead
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.view(*lead, weight.shape[0])  # (..., F)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qx, sx, qw, sw = ctx.saved_tensors
        scalers: _Scalers = ctx.scalers
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g2 = grad_out.reshape(-1, qw.shape[0])  # (N, F)
        sg = scalers.grad.scale(g2)
        qg = quantize(g2, sg, scalers.grad.fmt)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = scaled_gemm(qg, sg, qw.t(), sw, out_dtype=x_dtype, native=scalers.native)  # (N, K)
            grad_x = grad_x.view(*ctx.lead, qw.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = scaled_gemm(qg.t(), sg, qx.t(), sx, out_dtype=w_dtype, native=scalers.native)  # (F, K)
        if ctx.needs_input_grad[2]:
            grad_b = g2.float().sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs run in FP8 (module docstring). Build it with ``from_linear``."""

    scalers: _Scalers

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, input: Scaler, weight: Scaler, grad: Scaler, native: bool = True
    ) -> FP8Linear:
        """The same parameters as ``linear`` (no copy, nothing read: works on the meta device)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        if linear.bias is None:
            module.register_parameter("bias", None)
        else:
            module.bias = linear.bias
        if input.fmt is not E4M3 or weight.fmt is not E4M3 or grad.fmt not in (E4M3, E5M2):
            raise ValueError("FP8Linear: input and weight must be E4M3, the gradient E4M3 or E5M2")
        module.scalers = _Scalers(input=input, weight=weight, grad=grad, native=native)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.weight, "device_mesh") or hasattr(x, "device_mesh"):
            raise UserError(
                "an fp8 recipe got a sharded DTensor weight or input for an FP8 linear: per-tensor FP8 scales need "
                "the global amax; use fsdp (it gathers whole weights) instead of tensor parallelism with fp8 recipes"
            )
        return _FP8LinearFn.apply(x, self.weight, self.bias, self.scalers)

    def extra_repr(self) -> str:
        s = self.scalers
        return (
            f"{super().extra_repr()}, fp8: input {s.input.fmt.name}, weight {s.weight.fmt.name}, grad {s.grad.fmt.name}"
        )
