"""Gradient reductions that must be right across shards: the global norm and finiteness.

Every gradient element counts once in the norm, however the layouts spread it: a ``DTensor``'s
shards are summed over its mesh and its replicated copies counted once, a plain tensor is whole
on every rank unless a layout says its ranks hold different ones (pipeline stages, experts), and
the whole norm costs one all-reduce of one scalar. Scalars agreed by all
ranks reduce over each dimension of the run's mesh in turn, never over an implicit global
group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from math import prod
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate

from mcore.mesh import ParallelMesh
from mcore.norms import fp32_norms


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


def global_grad_norm(
    params: Iterable[torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]],
    mesh: ParallelMesh | None = None,
    layouts: Sequence[Any] = (),
) -> torch.Tensor:
    """The L2 norm of all gradients of the model as one vector (fp32, a plain 0-d tensor).

    Every element counts once however the layouts spread it: each rank sums the squares of the
    gradient values it holds (a ``DTensor``'s local shard), weighted by ``1 / replicas`` — the
    number of ranks holding the same values — and one all-reduce over ``mesh`` adds the ranks'
    sums. A ``DTensor``'s replicas are the ranks outside its own mesh times its ``Replicate``
    dimensions; a plain tensor's are all ranks. A layout whose ranks hold *different* plain
    parameters (pipeline stages, experts) or a few copies (a tied embedding on the first and
    last stage) says so with ``grad_norm_replicas(name, param)`` (``ParallelLayout``). Without
    ``mesh`` (or on one rank) it is the local norm. ``params``: parameters, or ``(name,
    parameter)`` pairs (needed when a layout answers per name).
    """
    pairs = [(item if isinstance(item, tuple) else ("", item)) for item in params]
    world = mesh.world_size if mesh is not None and mesh.device_mesh is not None else 1
    by_replicas: dict[float, list[torch.Tensor]] = {}  # one multi-tensor norm per weight, not one kernel per gradient
    for name, p in pairs:
        g = p.grad
        if g is None:
            continue
        local = g.to_local() if isinstance(g, DTensor) else g
        copies = _replicas(name, p, g, mesh, layouts, world) if world > 1 else 1.0  # type: ignore[arg-type]
        by_replicas.setdefault(copies, []).append(local.detach())
    if not by_replicas:
        total = torch.zeros((), device=mesh.device if mesh is not None else None)
    else:
        total = sum(
            ((torch.stack(fp32_norms(grads, 2.0)) ** 2).sum() / copies for copies, grads in by_replicas.items()),
            torch.zeros((), device=next(iter(by_replicas.values()))[0].device),
        )
    if world > 1:
        assert mesh is not None
        total = mesh_all_reduce(total.reshape(1).to(mesh.device), mesh)[0]
    return total.sqrt()


def _replicas(
    name: str, param: torch.Tensor, grad: torch.Tensor, mesh: ParallelMesh, layouts: Sequence[Any], world: int
) -> float:
    """Ranks that hold the same values of ``grad`` as this one (``global_grad_norm``)."""
    if isinstance(grad, DTensor):
        sub = grad.device_mesh
        copies = world // sub.size()
        for dim, placement in enumerate(grad.placements):
            if isinstance(placement, Partial):
                raise ValueError(f"gradient of {name or 'a parameter'} is a Partial DTensor: reduce it before the norm")
            if isinstance(placement, Replicate):
                copies *= sub.size(dim)
    else:
        copies = world
    for layout in layouts:
        answer = getattr(layout, "grad_norm_replicas", None)
        if answer is None:
            continue
        held = answer(name, param)
        if held is not None:  # this layout's dims: ``held`` copies instead of all of them
            copies = copies // prod(mesh.size(d) for d in layout.mesh_dims) * held
    return float(max(copies, 1))


def clip_factor(max_norm: float, total: torch.Tensor) -> torch.Tensor:
    """``min(1, max_norm / (total + 1e-6))`` as a 0-d fp32 tensor on ``total``'s device (no host sync): computed in
    float64 as Python would, then rounded once to fp32, so multiplying fp32 gradients by it is what ``clip_grads_``
    does to them (and exactly 1 where nothing is clipped)."""
    return (max_norm / (total.detach().to(torch.float64) + 1e-6)).clamp(max=1.0).to(torch.float32)


def clip_grads_(params: list[torch.nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """Scale every gradient by ``min(1, max_norm / total)`` (``total`` from ``global_grad_norm``). fp32/fp64
    gradients are scaled on the device with no host sync: the factor computed in float64 as Python computes it
    (``max_norm / (total + 1e-6)``), multiplied as the same fp32 number a Python scalar would be, and by exactly 1
    where no clipping is needed, which changes no value. Lower-precision gradients take the factor from the host
    (a multi-tensor multiply by a 0-d tensor rounds the factor to their dtype; a Python scalar does not)."""
    grads = [g.to_local() if isinstance(g, DTensor) else g for p in params if (g := p.grad) is not None]
    grads = [g for g in grads if g.numel()]  # a DTensor's local shard is its storage
    wide = [g for g in grads if g.dtype in (torch.float32, torch.float64)]
    narrow = [g for g in grads if g.dtype not in (torch.float32, torch.float64)]
    if wide:
        coef = (max_norm / (total.detach().to(wide[0].device, torch.float64) + 1e-6)).clamp(max=1.0)  # 0-d
        for dtype in {g.dtype for g in wide}:
            torch._foreach_mul_([g for g in wide if g.dtype == dtype], coef.to(dtype))
    if narrow:
        factor = max_norm / (float(total) + 1e-6)
        if factor < 1.0:
            torch._foreach_mul_(narrow, factor)
