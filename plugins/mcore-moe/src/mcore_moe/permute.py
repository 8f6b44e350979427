"""Permute tokens to expert-grouped rows and combine them back, by the known permutation (no ``index_add``).

Why: the dispatchers sort each token's K slots to rows grouped by expert; with that permutation known (``slots``:
the slot of each row; ``positions``: the row of each slot, -1 where none) both directions are gathers:

* ``permute_rows``: the rows are ONE gather of the tokens (``index_select``); its backward sums each token's rows
  (a gather by ``positions``) instead of an accumulate-scatter;
* ``combine_rows``: each token's rows gathered, weighted and summed over K in fp32 (``mcore_moe.permute_triton``),
  stored once in the rows' dtype; backward deterministic (each row's gradient written by its one slot, the weights'
  gradients reduced in registers), no fp32 ``(N, H)`` buffer and no atomics.

On CUDA with Triton (``kernel_choice``); the dispatchers keep the torch path (``hidden[tokens]`` and the fp32
``index_add`` of ``dispatcher._weighted_sum``) as the reference everywhere else.

Shape legend: N tokens, K slots per token, H hidden size, M rows (R with a fixed-capacity buffer's padding).
"""

from __future__ import annotations

from typing import Any

import torch


def slot_positions(slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``slots (M,)`` (the slot of each row) -> ``(num_slots,)`` int64: the row of each slot, -1 where none."""
    positions = torch.full((num_slots,), -1, dtype=torch.long, device=slots.device)
    return positions.scatter_(0, slots, torch.arange(slots.shape[0], device=slots.device))


def slot_positions_padded(order: torch.Tensor, real: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``order (R,)`` (the slot of each row), ``real (R,)`` (the row holds a slot; padding rows do not) ->
    ``(num_slots,)`` int64: the row of each slot, -1 where none. Static shapes, no host sync."""
    spare = torch.where(real, order, num_slots)  # padding rows write to one spare place, dropped after
    rows = torch.where(real, torch.arange(order.shape[0], device=order.device), -1)  # (R,)
    positions = torch.full((num_slots + 1,), -1, dtype=torch.long, device=order.device)
    return positions.scatter_(0, spare, rows)[:num_slots]


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(positions)
        return hidden.index_select(0, tokens)  # (M, H): one gather

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        from mcore_moe.permute_triton import gather_sum

        (positions,) = ctx.saved_tensors
        return gather_sum(grad, positions, None), None, None  # (N, H): each token's rows summed


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, rows: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor, padded: bool
    ) -> torch.Tensor:
        from mcore_moe.permute_triton import gather_sum

        ctx.save_for_backward(rows, weights, positions)
        ctx.padded = padded
        return gather_sum(rows, positions, weights)  # (N, H)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        from mcore_moe.permute_triton import combine_backward

        rows, weights, positions = ctx.saved_tensors
        d_rows, d_weights = combine_backward(grad, rows, positions, weights, padded=ctx.padded)
        return d_rows, d_weights.to(weights.dtype), None, None


def permute_rows(hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden (N, H)`` -> ``(M, H)`` rows ``hidden[tokens]``; ``positions (N, K)``: the row of each slot (-1: none),
    for the backward (Triton: call where ``kernel_choice.use_triton`` says so)."""
    return _Permute.apply(hidden, tokens, positions)  # type: ignore[no-any-return]


def combine_rows(
    rows: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor, *, padded: bool = False
) -> torch.Tensor:
    """``rows (M, H)`` -> ``(N, H)``: ``sum over k of weights[t, k] * rows[positions[t, k]]`` (fp32 sum, the rows'
    dtype out); ``weights (N, K)`` in slot order (differentiable); ``padded``: some rows belong to no slot (never read,
    gradient zero). Triton: call where ``kernel_choice.use_triton`` says so."""
    return _Combine.apply(rows, weights, positions, padded)  # type: ignore[no-any-return]
