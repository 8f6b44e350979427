"""Gradient sums over one process group, and the switch that defers them during accumulation.

``tp`` sums the gradients of parameters each rank computes only a part of (shared key/value heads,
``partial`` scales, norms under sequence parallelism) and ``cp`` sums every gradient over the ranks
that split a micro-batch's tokens. Both sum once per step, after the last micro-batch's backward
(the sum is linear, so deferring it under ``no_grad_sync`` loses nothing), with one all-reduce per
dtype over a flat copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["DeferredSync", "local_grad", "sum_over_group"]


def local_grad(param: torch.Tensor) -> torch.Tensor:
    """``param``'s gradient as this rank holds it (a DTensor's local shard), made zeros when missing:
    a parameter unused on this rank still takes part in the sum."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    grad = param.grad
    return grad.to_local() if isinstance(grad, DTensor) else grad


def sum_over_group(grads: Iterable[torch.Tensor], group: Any) -> None:
    """Replace each of ``grads`` in place by its sum over ``group`` (one all-reduce per dtype)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        for g, part in zip(same, flat.split([g.numel() for g in same]), strict=True):
            g.copy_(part.view_as(g))


class DeferredSync:
    """``no_grad_sync()`` for layouts whose ``finish_grad_sync`` does its sums only when ``syncing``."""

    _sync: bool = True

    @property
    def syncing(self) -> bool:
        return self._sync

    @contextlib.contextmanager
    def no_grad_sync(self) -> Iterator[None]:
        before = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = before
