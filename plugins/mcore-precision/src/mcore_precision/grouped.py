"""MoE's grouped expert GEMM in a recipe's format: what the recipes' ``grouped_linear`` computes.

Shape legend: N routed rows sorted by expert, K input features, F output features, E experts.

``mcore.precision.grouped.grouped_linear`` hands a recipe ``x (N, K)``, ``weight (E, F, K)`` and
``group_sizes (E,)``. Each expert's rows and weight go through the quantised linear of ``fp8_linear`` with
the recipe's scheme, so every expert's forward and both backward GEMMs are quantised exactly as a
``FP8Linear`` of that scheme would quantise them on that expert alone (per-tensor scales per expert and per
expert's rows; 1x128 tiles of the wgrad GEMM never cross experts). Rows after the groups (a fixed-capacity
dispatcher's padding) give zeros, as in the reference. The GEMMs are emulated one expert at a time (or run
natively where the scheme's GEMM does); torch's scaled grouped GEMM is not used yet.
"""

from __future__ import annotations

import torch

from mcore_precision.fp8_linear import quantized_linear
from mcore_precision.scaling import Scheme

__all__ = ["grouped_quantized_linear"]


def grouped_quantized_linear(
    x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor, scheme: Scheme
) -> torch.Tensor:
    """``x[rows of e] @ weight[e].T`` per expert ``e`` with quantised GEMMs -> ``(N, F)`` (module docstring)."""
    if weight.dim() != 3 or x.dim() != 2 or x.shape[1] != weight.shape[2] or group_sizes.shape != weight.shape[:1]:
        raise ValueError(
            f"grouped_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, group_sizes "
            f"{tuple(group_sizes.shape)}; allowed: (N, K), (E, F, K), (E,)"
        )
    sizes = [int(n) for n in group_sizes.tolist()]  # host sizes: one sync per call
    if sum(sizes) > x.shape[0] or min(sizes, default=0) < 0:
        raise ValueError(
            f"grouped_linear: group_sizes sum to {sum(sizes)} for {x.shape[0]} rows; "
            "allowed: non-negative sizes summing to at most the rows"
        )
    used = sum(sizes)
    parts = [
        quantized_linear(rows, weight[e], None, scheme) if rows.shape[0] else rows.new_zeros((0, weight.shape[1]))
        for e, rows in enumerate(torch.split(x[:used], sizes))
    ]  # (n_e, F) each
    parts.append(x.new_zeros((x.shape[0] - used, weight.shape[1])))
    return torch.cat(parts)
