"""Grouped expert GEMMs: the one call an MoE block makes, which a precision recipe may take over.

Shape legend: N routed token rows (sorted by expert), K input features, F output features, E experts.

``grouped_linear(x, weight, group_sizes, ctx=ctx)`` computes ``x[rows of e] @ weight[e].T`` for
each expert ``e``, the rows of expert ``e`` being the ``group_sizes[e]`` consecutive rows after
those of experts ``0..e-1``. When the context carries a precision recipe with a
``grouped_linear`` method (FP8/MXFP8: quantise activations and weights, scaled grouped GEMM), the
recipe computes it; otherwise the plain reference does. The MoE plugin calls this function and
never imports a precision plugin; a recipe returns ``NotImplemented`` for shapes or devices it
does not handle, and the reference runs.
"""

from __future__ import annotations

from typing import Any

import torch


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """``x (N, K)``, ``weight (E, F, K)``, ``group_sizes (E,)`` int summing to at most N -> ``(N, F)``, one GEMM
    per expert; rows after the groups (a fixed-capacity dispatcher's padding) give zeros."""
    if weight.dim() != 3 or x.dim() != 2 or x.shape[1] != weight.shape[2]:
        raise ValueError(
            f"grouped_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be (N, K), (E, F, K)"
        )
    if group_sizes.shape != (weight.shape[0],):
        raise ValueError(f"grouped_linear: group_sizes {tuple(group_sizes.shape)} must be ({weight.shape[0]},)")
    sizes = [int(n) for n in group_sizes.tolist()]  # host sizes: one sync per call
    if sum(sizes) > x.shape[0] or min(sizes, default=0) < 0:
        raise ValueError(
            f"grouped_linear: group_sizes sum to {sum(sizes)} (negative: {min(sizes, default=0) < 0}); "
            f"x has {x.shape[0]} rows (allowed: a sum of non-negative sizes up to the rows)"
        )
    padding = x.shape[0] - sum(sizes)
    parts = [rows @ weight[e].T for e, rows in enumerate(torch.split(x[: sum(sizes)], sizes))]  # (n_e, F) each
    parts.append(x.new_zeros((padding, weight.shape[1])))
    return torch.cat(parts)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor, *, ctx: Any = None
) -> torch.Tensor:
    """The recipe's grouped GEMM (``ctx.precision.grouped_linear``) when it takes the call, else the reference."""
    recipe = getattr(ctx, "precision", None)
    take = getattr(recipe, "grouped_linear", None)
    if take is not None:
        out = take(x, weight, group_sizes)
        if out is not NotImplemented:
            return out
    return grouped_linear_reference(x, weight, group_sizes)
