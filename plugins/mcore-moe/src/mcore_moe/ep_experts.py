"""The experts of one ``ep`` rank: ``GroupedSwiGLU`` whose stacked weights are ``Shard(0)`` DTensors over ``ep``.

Why a module of its own: the ``ep`` layout keeps each expert weight as a DTensor (``(E, F, H)`` globally,
this rank's ``(E_l, F, H)`` rows locally) so the optimizer, the gradient norm and
``torch.distributed.checkpoint`` see the whole tensor and a checkpoint reshards across ep sizes; the
grouped GEMMs, though, run on the local rows. ``shard_experts`` swaps the module's class for
``ShardedGroupedSwiGLU`` (as FSDP2's ``fully_shard`` does: same object, same parameter names); the forward
reads each weight's local tensor (``to_local`` is differentiable: the gradient comes back as a DTensor with
the parameter's placements). The local ``gate`` and ``up`` stay views of one ``(E_l, 2, F, H)`` buffer (as
``GroupedSwiGLU`` lays them out), so the gate/up GEMM reads ``[gate | up]`` without a copy; the DTensors
describe the whole tensors as contiguous. Under ``fsdp`` the weights it sees between gather and reshard are the
same ep DTensors (``mcore_fsdp.tp_params``), so nothing changes there.

Shape legend: E experts, E_l = E / ep experts on this rank, F expert FFN size, H hidden size, M routed rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Shard

from mcore_moe.experts import GroupedSwiGLU

#: The stacked expert weights (dim 0: the experts) that the layout shards.
WEIGHTS: tuple[str, ...] = ("gate", "up", "down")


class ShardedGroupedSwiGLU(GroupedSwiGLU):
    """``GroupedSwiGLU`` whose weights an ``ep`` layout sharded (``GroupedSwiGLU.forward`` computes with their
    local rows): the class tells a later layout the experts are split already."""


def split_over_tp(experts: GroupedSwiGLU) -> bool:
    """Whether a ``tp`` layout split the experts' FFN already (expert TP): weights DTensors over ``tp``."""
    return any(isinstance(w, DTensor) and "tp" in (w.device_mesh.mesh_dim_names or ()) for w in experts.parameters())


def shard_experts(experts: GroupedSwiGLU, device_mesh: Any, rank: int, size: int, tp_mesh: Any = None) -> None:
    """Keep experts ``rank * E_l .. (rank + 1) * E_l - 1`` of ``experts`` as ``Shard(0)`` DTensors over
    ``device_mesh`` (the ``ep`` sub-mesh), in place; on the meta device only the local shapes are made.

    ``tp_mesh``: the 2-d ``(ep, tp)`` mesh, for weights a ``tp`` layout split along the FFN already (expert TP):
    their local FFN slice keeps its tp placement, ``(Shard(0), Shard(d))`` over ``(ep, tp)``. The local ``gate``
    and ``up`` are views of one ``(E_l, 2, F_l, H)`` buffer, as ``GroupedSwiGLU`` keeps them (``pack``), so the
    forward reads their ``[gate | up]`` stack in place."""
    locals_: dict[str, torch.Tensor] = {}
    for name in WEIGHTS:
        full: nn.Parameter = getattr(experts, name)
        per_rank = full.shape[0] // size
        source = full.to_local().detach() if isinstance(full, DTensor) else full.detach()  # tp: its FFN slice
        if source.is_meta:
            locals_[name] = torch.empty((per_rank, *source.shape[1:]), dtype=full.dtype, device="meta")
        else:
            locals_[name] = source[rank * per_rank : (rank + 1) * per_rank]  # (E_l, ...), copied below
    gate, up = locals_["gate"], locals_["up"]
    if gate.shape == up.shape and gate.dtype == up.dtype:  # packed: [gate | up] of the local experts is a view
        buffer = torch.stack([gate, up], dim=1)  # (E_l, 2, F_l, H), on meta only shapes
        locals_["gate"], locals_["up"] = buffer[:, 0], buffer[:, 1]
    else:
        locals_["gate"], locals_["up"] = gate.clone(), up.clone()
    locals_["down"] = locals_["down"].clone()
    for name in WEIGHTS:
        full = getattr(experts, name)
        mesh: Any = device_mesh
        placements: tuple[Placement, ...] = (Shard(0),)
        if isinstance(full, DTensor):  # split over tp: (E, F / tp, H) or (E, H, F / tp) locally
            mesh, placements = tp_mesh, (Shard(0), *full.placements)
        whole = torch.empty(full.shape, device="meta").stride()  # contiguous: the packed views' strides are local
        sharded = DTensor.from_local(locals_[name], mesh, placements, run_check=False, shape=full.shape, stride=whole)
        setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
    experts.__class__ = ShardedGroupedSwiGLU
