"""Autograd steps at the edge of a tensor-parallel region, for blocks that must not import ``torch.distributed``.

A block whose heads are split over ranks sometimes computes one tensor before the split that
every head reads afterwards (MLA's rope key): each rank's backward then yields only its heads'
part of that tensor's gradient. ``sum_grad_over`` (identity forward, gradient summed over the
group in backward) makes it whole again; blocks reach it through
``BlockContext.share_across_heads``, which the layout enables by setting ``head_group``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):  # type: ignore[override]
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_over(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """``tensor`` in forward; its gradient summed over ``group`` in backward."""
    return _SumGrad.apply(tensor, group)
