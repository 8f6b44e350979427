"""The quantised linear the low-precision recipes put in place of a model's matrix ``nn.Linear``s, and its GEMMs.

Shape legend: N rows of the input (batch and sequence flattened), K input features, F output features.

Forward ``y = x @ w.T``; backward ``dx = g @ w`` and ``dw = g.T @ x``, every operand quantised by the linear's
scaling scheme (``scaling``: per tensor, rowwise, blockwise, MXFP8, NVFP4) along that GEMM's reduction dim.
An operand the scheme quantises once (per-tensor scales, weight blocks) is saved quantised and its transpose
serves backward; the others are saved in high precision and quantised again in the other layout. The bias,
when there is one, stays in high precision.

Each GEMM runs natively (``native``: torch's scaled-mm kernels) where the scheme, card, torch and shapes allow
it, and is emulated elsewhere: the same quantised operands dequantised to fp32 and multiplied in fp32
(format-exact operands, accumulation unlike the hardware's). The module keeps the original linear's
parameters (same objects, same names), so declarations, optimizers and checkpoints see the model unchanged;
it is an ``nn.Linear`` subclass, so ``isinstance`` checks of layouts still hold. A weight FSDP gathered in the
scheme's format (``fsdp_gather``, attached as a ``QuantizedWeight``) is used as is: no quantisation of it here. On storage-less tensors
(meta, or ``mcore plan``'s fake tensors) it runs the plain linear: shapes only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import nn

from mcore.errors import UserError
from mcore.precision import quantized
from mcore_precision import fsdp_gather, native
from mcore_precision.scaling import Quantized, Scaler, Scheme, TensorScheme, Transposable

__all__ = ["FP8Linear", "Scaler", "native_scaled_mm_available", "quantized_linear", "storage_less"]


def native_scaled_mm_available(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` can run on ``device`` (``native``)."""
    return native.native_scaled_mm_available(device)


def storage_less(x: torch.Tensor) -> bool:
    """``x`` has no memory behind it (meta, or a fake tensor of ``mcore plan``): shapes only."""
    from torch._subclasses.fake_tensor import is_fake

    return x.is_meta or is_fake(x)


def _saved(t: torch.Tensor, q: Quantized, reused: bool) -> tuple[list[torch.Tensor], Any]:
    """What backward keeps of an operand: the quantised copy's tensors (and the copy, emptied of them) where the
    scheme reuses it, else the high-precision tensor; all tensors through ``save_for_backward`` (so saved-tensor
    hooks, recompute and offloading see them)."""
    if not reused:
        return [t], None
    data_t = getattr(q, "data_t", None)
    if data_t is not None:  # backward reads the transposed copy only: keep it, ``data`` a view of it (no 2nd copy)
        q = dataclasses.replace(q, data=data_t.t())  # type: ignore[type-var]
    names = [f.name for f in dataclasses.fields(q) if isinstance(getattr(q, f.name), torch.Tensor)]  # type: ignore[arg-type]
    return [getattr(q, n) for n in names], (dataclasses.replace(q, **dict.fromkeys(names)), names)  # type: ignore[type-var]


def _restored(tensors: list[torch.Tensor], layout: Any) -> Any:
    """The high-precision tensor, or the quantised copy rebuilt from its saved tensors (``_saved``)."""
    if layout is None:
        return tensors[0]
    empty, names = layout
    return dataclasses.replace(empty, **dict(zip(names, tensors)))


class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scheme: Scheme,
        given: tuple[Quantized, Quantized | None] | None,
    ) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # (N, K)
        qx = scheme.quantize(x2, "input", "fprop")
        qw = scheme.quantize(weight, "weight", "fprop") if given is None else given[0]
        out = scheme.gemm(qx, qw, x.dtype)  # (N, F)
        if bias is not None:
            out = out + bias.to(out.dtype)
        # what backward needs: the quantised copy where the scheme reuses it, else the high-precision tensor;
        # a weight given quantised (FSDP's gather) is never read in high precision: its dgrad copy is kept
        saved_x, ctx.x_layout = _saved(x2, qx, "input" in scheme.reuse)
        ctx.w_direct = given is not None and given[1] is not None  # dgrad's (K, F) operand itself
        if given is None:
            saved_w, ctx.w_layout = _saved(weight, qw, "weight" in scheme.reuse)
        else:
            saved_w, ctx.w_layout = _saved(weight, given[1] if ctx.w_direct else qw, True)  # type: ignore[arg-type]
        ctx.save_for_backward(*saved_x, *saved_w)
        ctx.split = len(saved_x)
        ctx.scheme, ctx.lead, ctx.shape = scheme, lead, (weight.shape[0], k)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.view(*lead, weight.shape[0])  # (..., F)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        x_saved = _restored(saved[: ctx.split], ctx.x_layout)  # (N, K): x2, or its quantised copy
        w_saved = _restored(saved[ctx.split :], ctx.w_layout)  # (F, K): the weight, or its quantised copy
        scheme: Scheme = ctx.scheme
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        f, k = ctx.shape
        g2 = grad_out.reshape(-1, f)  # (N, F)
        qg = scheme.quantize(g2, "grad", "dgrad")
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            reused = ctx.w_layout is not None
            if ctx.w_direct:
                qwt = w_saved  # (K, F): the gathered column-wise copy
            else:
                qwt = w_saved.t() if reused else scheme.quantize(w_saved.t(), "weight", "dgrad")  # (K, F)
            grad_x = scheme.gemm(qg, qwt, x_dtype).view(*ctx.lead, k)  # (..., K)
        if ctx.needs_input_grad[1]:
            reused = ctx.x_layout is not None
            qgt = (
                cast(Transposable, qg).t() if "grad" in scheme.reuse else scheme.quantize(g2.t(), "grad", "wgrad")
            )  # (F, N)
            qxt = x_saved.t() if reused else scheme.quantize(x_saved.t(), "input", "wgrad")  # (K, N)
            grad_w = scheme.gemm(qgt, qxt, w_dtype)  # (F, K)
        if ctx.needs_input_grad[2]:
            grad_b = g2.float().sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: Scheme,
    given: tuple[Quantized, Quantized | None] | None = None,
) -> torch.Tensor:
    """``x (..., K) @ weight (F, K).T + bias`` with every GEMM quantised by ``scheme`` (module docstring).

    ``given``: the weight already quantised (FSDP gathered it in the scheme's format, ``fsdp_gather``): the forward
    operand ``(F, K)`` and dgrad's ``(K, F)`` (or ``None``: the forward one's transpose); ``weight`` is then only
    what its gradient flows to (its values are not read)."""
    if not torch.compiler.is_compiling() and (storage_less(x) or storage_less(weight)):
        return torch.nn.functional.linear(x, weight, bias)  # traced by torch.compile: real tensors when it runs
    out: torch.Tensor = _QuantizedLinearFn.apply(x, weight, bias, scheme, given)
    return out


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs run quantised by its ``scheme`` (module docstring). Build it with
    ``from_scheme``, or ``from_linear`` for per-tensor scales from three ``Scaler``s."""

    scheme: Scheme

    @classmethod
    def from_scheme(cls, linear: nn.Linear, scheme: Scheme) -> FP8Linear:
        """The same parameters as ``linear`` (no copy, nothing read: works on the meta device)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        if linear.bias is None:
            module.register_parameter("bias", None)
        else:
            module.bias = linear.bias
        module.scheme = scheme
        return module

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, input: Scaler, weight: Scaler, grad: Scaler, native: bool = True
    ) -> FP8Linear:
        """Per-tensor scales (``TensorScheme``): input and weight E4M3, the gradient E4M3 or E5M2."""
        return cls.from_scheme(linear, TensorScheme(input=input, weight=weight, grad=grad, native=native))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.weight, "device_mesh") or hasattr(x, "device_mesh"):
            raise UserError(
                "a low-precision recipe got a sharded DTensor weight or input for an FP8 linear: its scales need the "
                "global amax; use fsdp (it gathers whole weights) instead of tensor parallelism with these recipes"
            )
        given = quantized.compute_weight(self.weight)  # FSDP gathered the weight quantised: its GEMMs read that
        return quantized_linear(
            x, self.weight, self.bias, self.scheme, fsdp_gather.operands(given) if given is not None else None
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.scheme.describe()}"
