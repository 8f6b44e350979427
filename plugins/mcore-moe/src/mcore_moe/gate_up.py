"""The experts' gate and up projections as ONE grouped GEMM producing ``(M, 2F)`` rows ``[gate | up]``.

Why: two grouped GEMMs read the routed rows twice and launch twice; one over the weights stacked along the FFN dim
reads them once, and its output is what the fused SwiGLU (``mcore_moe.swiglu``) takes. The parameters stay separate
``gate`` and ``up`` ``(E_l, F, H)`` (checkpoints, Hugging Face maps and expert TP, which shards each by FFN rows,
are unchanged), but ``GroupedSwiGLU`` lays them out back to back per expert in one ``(E_l, 2, F, H)`` buffer
(built so, packed again after ``.to()`` and meta materialization: ``GroupedSwiGLU.pack``), so ``stacked_gate_up``
reads the stack as a view and neither the forward nor the backward copies the weights, in training as in
inference (``ep`` keeps each rank's local gate and up packed too). Where a layout holds them in buffers of its own
(FSDP's gathered ones, ``ddp``'s sharded values, expert TP without ``ep``) or ``distributed-adamw`` gave them
contiguous storage, the stack is a transient ``(E_l, 2F, H)`` concatenation per call.

* ``torch._grouped_mm`` path (CUDA bf16, the device's probe passed): ``_GateUpGroupedMM``, whose backward computes
  ``d rows`` as one grouped GEMM over the stacked weight and ``d gate``, ``d up`` straight into their own contiguous
  ``(E_l, F, H)`` (no gradient of the stack to split and copy); the stack is rebuilt in backward, not saved.
* otherwise ``grouped_linear`` over ``cat([gate, up], 1)`` (the per-expert reference): autograd through the
  concatenation. (``GroupedSwiGLU`` sends a precision recipe's calls down its unfused path, one GEMM per weight.)

Shape legend: M routed rows sorted by expert, H hidden size, F expert FFN size, E_l local experts.
"""

from __future__ import annotations

from typing import Any

import torch

from mcore.precision.grouped import grouped_linear


def stacked_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``[gate | up]`` ``(E_l, 2F, H)`` as a view when ``gate`` and ``up`` ``(E_l, F, H)`` lie in one
    ``(E_l, 2, F, H)`` buffer (``packed_layout``); None otherwise (separate tensors, DTensors, meta tensors, while
    tracing), where callers concatenate."""
    if torch.compiler.is_compiling() or gate.is_meta or up.dtype != gate.dtype or not packed_layout(gate, up):
        return None
    e, f, h = gate.shape
    return gate.detach().as_strided((e, 2 * f, h), (2 * f * h, h, 1))


def packed_layout(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """``gate`` and ``up`` ``(E_l, F, H)`` (plain tensors) lie in one ``(E_l, 2, F, H)`` storage, each expert's up
    right after its gate (``GroupedSwiGLU.pack``), judged from strides and storages alone: meta tensors too."""
    if type(gate) not in _PLAIN or type(up) not in _PLAIN or gate.dim() != 3 or up.shape != gate.shape:
        return False
    _, f, h = gate.shape
    strides = (2 * f * h, h, 1)
    if gate.stride() != strides or up.stride() != strides or up.storage_offset() != gate.storage_offset() + f * h:
        return False
    same = storage_id(gate)
    return same is not None and same == storage_id(up)


def storage_id(t: torch.Tensor) -> int | None:
    """Which storage ``t`` lies in (meta tensors included: their storages have no address to compare); None for a
    tensor subclass without one of its own."""
    try:
        return int(t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError, TypeError):
        return None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _stack(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[gate | up]`` ``(E_l, 2F, H)``: a view when packed, else a concatenated copy (no autograd through it)."""
    view = stacked_gate_up(gate, up)
    return view if view is not None else torch.cat([gate, up], dim=1)


class _GateUpGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, rows: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        stacked = _stack(gate, up)  # (E_l, 2F, H): a view when packed, else transient
        ctx.save_for_backward(rows, gate, up, offsets)
        return torch._grouped_mm(rows, stacked.transpose(-2, -1), offs=offsets)  # (M, 2F)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, gate, up, offsets = ctx.saved_tensors
        return (*gate_up_grads(grad, rows, gate, up, offsets, tuple(ctx.needs_input_grad[:3])), None)


def gate_up_grads(
    grad: torch.Tensor,
    rows: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    offsets: torch.Tensor,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``d rows (M, H)``, ``d gate``, ``d up`` ``(E_l, F, H)`` (each where ``needs`` says) of ``[gate | up]``
    rows given their gradient ``grad (M, 2F)``, by ``torch._grouped_mm`` (``offsets``: end rows, int32)."""
    f = gate.shape[1]
    grad = grad.contiguous()  # (M, 2F)
    d_rows = d_gate = d_up = None
    if needs[0]:
        stacked = _stack(gate, up)  # (E_l, 2F, H)
        d_rows = torch._grouped_mm(grad, stacked, offs=offsets)  # (M, H): one GEMM over both halves
    if needs[1]:
        d_gate = torch._grouped_mm(grad[:, :f].t(), rows, offs=offsets)  # (E_l, F, H)
    if needs[2]:
        d_up = torch._grouped_mm(grad[:, f:].t(), rows, offs=offsets)  # (E_l, F, H)
    return d_rows, d_gate, d_up


def gate_up_grouped_mm(
    rows: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, tokens_per_expert: torch.Tensor
) -> torch.Tensor:
    """``rows (M, H)`` grouped by expert times ``[gate | up][e].T`` -> ``(M, 2F)`` by one ``torch._grouped_mm``
    (offsets on the device: no host sync; rows past the groups are padding)."""
    offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)  # (E_l,) end row of each expert
    return _GateUpGroupedMM.apply(rows, gate, up, offsets)  # type: ignore[no-any-return]


def gate_up_linear(
    rows: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    ctx: Any = None,
    *,
    grouped_mm: bool = False,
) -> torch.Tensor:
    """``rows (M, H)`` of expert ``e`` times ``[gate | up][e].T`` (``gate``, ``up`` ``(E_l, F, H)``) -> ``(M, 2F)``.

    ``grouped_mm``: the caller found ``torch._grouped_mm`` fits (device, dtype, sizes) and no precision recipe takes
    the call; else ``grouped_linear`` (the recipe's, or the reference) over the stacked weight."""
    if grouped_mm:
        return gate_up_grouped_mm(rows, gate, up, tokens_per_expert)
    return grouped_linear(rows, torch.cat([gate, up], dim=1), tokens_per_expert, ctx=ctx)  # (M, 2F)
