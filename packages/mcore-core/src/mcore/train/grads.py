"""Gradient reductions that must be right across shards: the global norm and finiteness.

A gradient that is a ``DTensor`` contributes the norm of the whole tensor it represents
(its shards' squares summed over the mesh, replicated copies counted once); a plain tensor
is whole on every rank (replicated by the layouts) and counts once. Scalars agreed by all
ranks reduce over each dimension of the run's mesh in turn, never over an implicit global
group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from mcore.mesh import ParallelMesh


def mesh_all_reduce(value: torch.Tensor, mesh: ParallelMesh, op: str = "sum") -> torch.Tensor:
    """Reduce ``value`` in place over every rank of ``mesh`` (``op``: sum, min or max)."""
    if mesh.device_mesh is None:
        return value
    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    for dim in mesh.dim_names:
        group = mesh.group(dim)
        if group is not None:
            dist.all_reduce(value, op=reduce_op, group=group)
    return value


def global_grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients as one vector (fp32, a plain 0-d tensor)."""
    squares: list[torch.Tensor] = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        n = torch.linalg.vector_norm(g.detach(), 2, dtype=torch.float32)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()  # DTensor: reduces the partial norms of the shards
        squares.append(n.float() ** 2)
    if not squares:
        return torch.zeros(())
    return torch.stack(squares).sum().sqrt()


def clip_grads_(params: list[torch.nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """Scale every gradient by ``min(1, max_norm / total)`` (``total`` from ``global_grad_norm``)."""
    coef = max_norm / (float(total) + 1e-6)
    if coef >= 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)
