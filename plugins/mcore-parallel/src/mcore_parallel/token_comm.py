"""Collectives over a sequence split by tokens: sequence parallelism's regions, ``cp``'s all-gathered keys, overlap.

Shape legend: B rows, Tl one rank's tokens per row, ``*rest`` the trailing dims (hidden, or heads x head dim).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_single", "all_gather_tokens", "reduce_scatter_single"]

#: torch 2.13's names of the flat collectives, or the older ones (feature-detected, never pinned)
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_tokens(local: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """``(B, Tl, *rest)`` from each rank -> ``(B, world * Tl, *rest)`` in rank order."""
    local = local.contiguous()
    batch, rows, *rest = local.shape
    out = local.new_empty((world * batch, rows, *rest))  # ranks' tensors one after another along dim 0
    all_gather_single(out, local, group=group)
    return out.view(world, batch, rows, *rest).movedim(0, 1).reshape(batch, world * rows, *rest)
