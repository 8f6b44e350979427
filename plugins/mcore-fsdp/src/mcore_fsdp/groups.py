"""The process groups of a ``fully_shard`` mesh: shard along the last dim, replicate along the first.

A 1-D mesh is FSDP (shard only); a 2-D mesh ``(replicate, shard)`` is HSDP, FSDP2's
convention. Parameters become DTensors with ``(Shard(0),)`` or ``(Replicate(), Shard(0))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard


@dataclass(frozen=True, kw_only=True)
class MeshGroups:
    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shard_group: dist.ProcessGroup
    shard_rank: int
    shard_size: int
    replicate_group: dist.ProcessGroup | None
    replicate_size: int
    device: torch.device

    @property
    def dp_size(self) -> int:
        return self.shard_size * self.replicate_size


def default_mesh() -> DeviceMesh:
    """A 1-D mesh over every process (FSDP2's default when ``mesh`` is not given)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ValueError(
            "fully_shard(mesh=None) needs an initialised torch.distributed process group; "
            "launch with torchrun or pass mesh=<DeviceMesh>"
        )
    device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def mesh_groups(mesh: DeviceMesh) -> MeshGroups:
    if mesh.ndim not in (1, 2):
        raise ValueError(f"fully_shard: mesh has {mesh.ndim} dims; allowed: 1 (FSDP) or 2 (HSDP: replicate, shard)")
    if mesh.device_type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device(mesh.device_type)
    shard_dim = mesh.ndim - 1
    replicate = mesh.ndim == 2
    return MeshGroups(
        mesh=mesh,
        placements=(Replicate(), Shard(0)) if replicate else (Shard(0),),
        shard_group=mesh.get_group(shard_dim),
        shard_rank=mesh.get_local_rank(shard_dim),
        shard_size=mesh.size(shard_dim),
        replicate_group=mesh.get_group(0) if replicate and mesh.size(0) > 1 else None,
        replicate_size=mesh.size(0) if replicate else 1,
        device=device,
    )
