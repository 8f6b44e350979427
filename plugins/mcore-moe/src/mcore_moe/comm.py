"""Differentiable collectives over an expert-parallel group, built only on what gloo and NCCL both have.

Shape legend: N rows on this rank, W ranks in the group, H hidden size (any trailing dims).

* ``gather_rows(x, group)``: every rank's ``(N, ...)`` (same N) -> ``(W * N, ...)``; backward sums each
  rank's gradient of our rows (all-reduce, then our slice).
* ``scatter_sum_rows(x, group)``: ``(W * N, ...)`` partial sums -> our ``(N, ...)`` rows summed over the
  ranks; backward gathers the gradients.
* ``all_to_all_rows(x, send, recv, group)``: rows ``send[r]`` to rank ``r``, ``recv[r]`` from it; backward is
  the inverse exchange.
* ``mean_over_ranks(loss, group)``: a 0-d loss each rank computed on its share of the tokens (tp splitting a
  moe block's tokens) -> their mean, the same on every rank; backward gives each rank ``1 / W`` of the
  gradient (the ranks' parameter gradients are then summed over the group).
* ``sum_over_ranks(x, group)``: counts summed over the group (no gradient).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _gather(x: torch.Tensor, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def _my_rows(x: torch.Tensor, group: Any) -> torch.Tensor:
    n = x.shape[0] // dist.get_world_size(group)
    rank = dist.get_rank(group)
    return x[rank * n : (rank + 1) * n]


def _summed(x: torch.Tensor, group: Any) -> torch.Tensor:
    total = x.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _my_rows(_summed(grad, ctx.group), ctx.group).contiguous(), None


class _ScatterSumRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _my_rows(_summed(x, group), group).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather(grad.contiguous(), ctx.group), None


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _MeanOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.world = dist.get_world_size(group)
        return _summed(x, group) / ctx.world

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.world, None


def mean_over_ranks(loss: torch.Tensor, group: Any) -> torch.Tensor:
    """The mean of each rank's ``loss`` over ``group`` (differentiable: each rank's share of the gradient)."""
    return _MeanOverRanks.apply(loss, group)  # type: ignore[no-any-return]


@torch.no_grad()
def sum_over_ranks(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``x`` summed over ``group`` (a new tensor)."""
    return _summed(x, group)


def gather_rows(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``(N, ...)`` on each of W ranks -> ``(W * N, ...)`` in rank order (differentiable)."""
    return _GatherRows.apply(x, group)  # type: ignore[no-any-return]


def scatter_sum_rows(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``(W * N, ...)`` on each rank -> this rank's ``(N, ...)`` block summed over ranks (differentiable)."""
    return _ScatterSumRows.apply(x, group)  # type: ignore[no-any-return]


def all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    """Rows ``send[r]`` of ``x`` (in rank order) to rank ``r``; ``recv[r]`` rows back from it (differentiable)."""
    return _AllToAllRows.apply(x, send, recv, group)  # type: ignore[no-any-return]


def exchange_counts(counts: torch.Tensor, group: Any) -> torch.Tensor:
    """``(W, E_l)`` rows this rank sends to each rank's local experts -> ``(W, E_l)`` it receives from each."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
