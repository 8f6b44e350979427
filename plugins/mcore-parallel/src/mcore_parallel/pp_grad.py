"""Deferred weight gradients for zero-bubble schedules, split at the linear layer.

A zero-bubble schedule runs each backward in two parts: ``B``, the input gradient the previous
stage waits for, and later ``W``, the weight gradients nobody waits for. The split is done where it
is sure to hold whatever else the model does (custom autograd functions, fused losses, kernels,
recompute): at each plain ``nn.Linear`` (the bulk of a block's weight-gradient work).
``defer_linears`` gives those linears a forward through ``_SplitLinear``; while ``WeightGradStore``
is recording (``recording(key)`` around a ``B``), its backward returns the input and bias gradients
and stores ``(weight, input, output gradient)`` under ``key``; ``apply(key)`` (the ``W``) adds
``grad_out^T @ input`` to each weight's ``.grad``. Outside ``recording`` it computes the weight
gradient at once, so evaluation, recompute replays and other schedules are unchanged. Every other
parameter (norm scales, embeddings, linears whose weight is a ``DTensor`` under ``tp``) gets its
gradient in ``B``.

The weight gradient is added to ``.grad`` directly, not through autograd: hooks a data-parallel
layout registers on gradient accumulation do not see it, so ``pp`` refuses a zero-bubble schedule
together with ``fsdp``, ``hsdp`` or ``ddp`` (``PPLayout.check_run``).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

Key = tuple[int, int]  # (micro-batch, stage)


class WeightGradStore:
    """What ``B`` left for ``W``: ``(weight, input, output gradient)`` per linear, by ``(micro-batch, stage)``."""

    def __init__(self) -> None:
        self.current: Key | None = None
        self._pending: dict[Key, list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]] = {}

    def recording(self, key: Key) -> _Recording:
        """Context manager: the linears' backward inside it defers weight gradients under ``key``."""
        return _Recording(self, key)

    def put(self, weight: nn.Parameter, inputs: torch.Tensor, grad_out: torch.Tensor) -> None:
        assert self.current is not None
        self._pending.setdefault(self.current, []).append((weight, inputs, grad_out))

    def apply(self, key: Key) -> None:
        """Add the weight gradients deferred under ``key`` to ``.grad`` (the ``W`` of a schedule)."""
        for weight, inputs, grad_out in self._pending.pop(key, []):
            grad = weight_grad(inputs, grad_out).to(weight.dtype)
            if weight.grad is None:
                weight.grad = grad
            else:
                weight.grad.add_(grad)

    def __len__(self) -> int:
        return len(self._pending)


class _Recording:
    def __init__(self, store: WeightGradStore, key: Key) -> None:
        self.store, self.key = store, key

    def __enter__(self) -> None:
        self.store.current = self.key

    def __exit__(self, *exc: object) -> None:
        self.store.current = None


def weight_grad(inputs: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``grad_out^T @ inputs`` over every leading dim: ``(out, in)``."""
    return grad_out.reshape(-1, grad_out.shape[-1]).t() @ inputs.reshape(-1, inputs.shape[-1])


class _SplitLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient may be deferred to the store (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, store: WeightGradStore, param: Any
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.param, ctx.has_bias = store, param, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None  # (..., in)
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            if ctx.store.current is not None:
                ctx.store.put(ctx.param, x, grad)
            else:
                grad_w = weight_grad(x, grad)
        return grad_x, grad_w, grad_b, None, None


def _split_forward(self: nn.Linear, x: torch.Tensor, store: WeightGradStore) -> torch.Tensor:
    weight: torch.Tensor = self.weight
    bias: torch.Tensor | None = self.bias
    if torch.is_autocast_enabled(x.device.type):  # autocast does not reach inside a Function: cast here
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return _SplitLinear.apply(x, weight, bias, store, self.weight)  # type: ignore[no-any-return]
    return _SplitLinear.apply(x, weight, bias, store, self.weight)  # type: ignore[no-any-return]


def defer_linears(module: nn.Module, store: WeightGradStore) -> int:
    """Route every plain ``nn.Linear`` of ``module`` (weight a plain tensor) through ``_SplitLinear``; how many."""
    count = 0
    for sub in module.modules():
        if type(sub) is nn.Linear and not isinstance(sub.weight, DTensor) and sub.weight.requires_grad:
            sub.forward = types.MethodType(lambda self, x, _s=store: _split_forward(self, x, _s), sub)  # type: ignore[method-assign]
            count += 1
    return count
