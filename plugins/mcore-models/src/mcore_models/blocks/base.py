"""What every block of this package shares: init declarations and helpers, parameter counting, config checks.

Each block declares how its parameters start (``ParamSpec.init``: read by ``mcore.construct``,
which fills any shard with the values the whole tensor would hold, keyed by seed and name).
``reset_parameters(generator)`` draws the same distributions from a CPU ``torch.Generator`` for
code that builds a block by hand.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mcore.params import Init, ParamSpec, collect_param_specs


@torch.no_grad()
def normal_(param: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    if param.is_meta:
        return
    values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
    param.copy_(values)


@torch.no_grad()
def draw_declared_(module: nn.Module, generator: torch.Generator | None) -> None:
    """Set every parameter under ``module`` from its declared ``init`` (``param_specs``), drawing normals in
    fp32 on the CPU from ``generator`` (for code that builds a module by hand; runs use ``mcore.construct``,
    whose values do not depend on the layout). Parameters on the meta device are left alone."""
    for name, spec in collect_param_specs(module).items():
        param, init = module.get_parameter(name), spec.init
        if param.is_meta or init is None:
            continue
        if init.kind == "normal":
            normal_(param, float(init.std or 1.0), generator)
            if init.mean:
                param.add_(init.mean)
        elif init.kind in ("zeros", "ones", "constant"):
            param.fill_({"zeros": 0.0, "ones": 1.0}.get(init.kind, init.value or 0.0))
        else:
            raise ValueError(f"{name}: init kind {init.kind!r} has no CPU-generator draw here; use mcore.construct")


def _plain(weight: torch.Tensor) -> bool:
    """A plain tensor or ``nn.Parameter`` (not a tensor subclass: a layout's DTensor, a quantized weight)."""
    return type(weight) is nn.Parameter or type(weight) is torch.Tensor


def fused_projection(hidden: torch.Tensor, linears: tuple[nn.Linear, ...]) -> torch.Tensor | None:
    """One GEMM over the concatenated weights of ``linears``: ``(..., H) -> (..., sum of out_i)``, or
    ``None`` when a weight (or bias) is not a plain tensor (a layout's ``DTensor`` shard, a quantized
    weight: concatenating it would gather or dequantize it), or when a linear is not exactly ``nn.Linear`` (a
    subclass such as a precision recipe's quantised linear computes its own GEMM)."""
    if any(type(linear) is not nn.Linear for linear in linears):
        return None
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears]
    if not all(_plain(w) for w in weights):
        return None
    if all(b is None for b in biases):
        return F.linear(hidden, _concat(weights, hidden.device.type))
    if all(b is not None and _plain(b) for b in biases):
        return F.linear(hidden, _concat(weights, hidden.device.type), _concat(biases, hidden.device.type))  # type: ignore[arg-type]
    return None


def _concat(tensors: list[torch.Tensor], device_type: str) -> torch.Tensor:
    """``torch.cat(tensors)``, each cast first to the autocast dtype when autocast is on: the GEMM
    would cast the concatenation anyway, and casting first concatenates half the bytes (fp32 -> bf16)
    instead of copying the fp32 weights and then casting the copy."""
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    packed = _adjacent_view(tensors)
    return packed if packed is not None else torch.cat(tensors)


def _adjacent_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The concatenation of ``tensors`` as a view, without a copy, when they lie back to back in one storage
    (``pack_linears`` put them there) and no gradient is wanted (a view of the storage would not route
    gradients to each parameter); else ``None``. Inference reads each weight once per step instead of
    reading it and writing and reading a concatenated copy (for a decode step: twice the weight traffic)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None  # compiled code cannot read storage addresses; the compiler fuses the copy away or keeps it
    if not _back_to_back(tensors):
        return None
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    offset = first.storage_offset()
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        first.untyped_storage(), offset, (rows, *first.shape[1:]), first.stride()
    )


def _back_to_back(tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` lie one after another, contiguous, in one storage (of one dtype, device and row shape):
    their concatenation is then a view."""
    first = tensors[0]
    expected = first.data_ptr()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.dtype != first.dtype
            or t.device != first.device
            or t.shape[1:] != first.shape[1:]
            or t.data_ptr() != expected
            or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        ):
            return False
        expected += t.numel() * t.element_size()
    return True


@torch.no_grad()
def pack_linears(linears: tuple[nn.Linear, ...]) -> bool:
    """Put the weights (and biases) of ``linears`` back to back in one new buffer, each parameter a view of
    it (same ``Parameter`` objects), so ``fused_projection`` under ``torch.no_grad`` reads them without a
    concatenated copy. For inference: training layouts that re-create parameters undo it harmlessly. Returns
    whether they are packed (only plain tensors of one dtype and device). Weights already back to back stay
    where they are: a second engine on the same model must not move the weights that a first engine's CUDA
    graphs read by address (they would replay over freed memory)."""
    for attr in ("weight", "bias"):
        params = [getattr(linear, attr) for linear in linears]
        if all(p is None for p in params):
            continue
        if any(p is None or not _plain(p) for p in params):
            return False
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device or p.shape[1:] != first.shape[1:] for p in params):
            return False
        if _back_to_back([p.data for p in params]):
            continue
        buffer = torch.cat([p.detach() for p in params])  # (sum of rows, ...)
        start = 0
        for param in params:
            rows = param.shape[0]
            param.data = buffer[start : start + rows]
            start += rows
    return True


def project(hidden: torch.Tensor, linears: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    """``[linear(hidden) for linear in linears]``, as one GEMM while the weights are plain tensors.

    Separate parameters shard by rows under tensor parallelism, but one GEMM reads the input once,
    casts it once under autocast and saves it once for backward (three linears on an fp32 input
    cast and save it three times). Otherwise (``fused_projection`` is ``None``) one GEMM per
    linear, the input cast once. Shapes: ``hidden (..., H)`` -> ``(..., out_i)`` per linear (views).
    """
    fused = fused_projection(hidden, linears)
    if fused is not None:
        return list(fused.split([linear.weight.shape[0] for linear in linears], dim=-1))  # rows held (a shard: its own)
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    return [linear(hidden) for linear in linears]


def linear_specs(
    linear: nn.Linear, role: str, std: float, *, head_rows: int | None = None, tp: str | None = None
) -> dict[str, ParamSpec]:
    """``weight`` (``role``, normal(0, ``std``)) and, if any, ``bias`` (zeros) of ``linear``, by name under it.

    ``tp``: how tensor parallelism splits the weight (``mcore.params.TP_STYLES``). The bias follows it:
    ``column`` for a column-parallel weight (its outputs are split), ``replicate`` for a row-parallel one
    (added once, after the partial outputs are summed) or a replicated one.
    """
    specs = {"weight": ParamSpec(role, head_rows=head_rows, init=Init("normal", std=std), tp=tp)}
    if linear.bias is not None:
        bias_tp = None if tp is None else "column" if tp == "column" else "replicate"
        specs["bias"] = ParamSpec("bias", head_rows=head_rows, init=Init("zeros"), tp=bias_tp)
    return specs


def prefixed(prefix: str, specs: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
    """``specs`` keyed ``prefix.name``."""
    return {f"{prefix}.{name}": spec for name, spec in specs.items()}


class Block(nn.Module):
    """Base class: ``num_parameters`` counts what the block owns (works on the meta device);
    ``reset_parameters(generator)`` draws every parameter from its declared ``init``."""

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        draw_declared_(self, generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_positive(owner: str, key: str, value: int | float | None) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is ``None`` or finite and > 0 (NaN is not).

    Messages name the field alone (``num_heads = 0: ...``): whoever validates the table prefixes
    it (``model.attention.num_heads``); ``owner`` documents the caller.
    """
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{key} = {value!r}: must be a finite number > 0")


def check_non_negative(owner: str, key: str, value: int | float) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is finite and >= 0 (NaN is not)."""
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{key} = {value!r}: must be a finite number >= 0")


def check_choice(owner: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} = {value!r}: allowed: {', '.join(allowed)}")
