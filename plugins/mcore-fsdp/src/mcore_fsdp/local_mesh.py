"""A device mesh for one process that has no ``torch.distributed`` process group.

``fsdp`` on a single process (no launcher) still makes its parameters DTensors, and DTensors
need a ``DeviceMesh``. Building one the usual way (``init_device_mesh``) needs the default
process group, and starting that group is a side effect the caller did not ask for: it
stays after ``apply`` and a later ``init_process_group`` of the caller fails.

``LocalMesh`` is a ``DeviceMesh`` of size 1 in every dimension that answers every query
itself (rank 0, local rank 0) and whose groups are one private 1-rank ``ProcessGroup``
(gloo on CPU, NCCL on CUDA) built on an in-memory store: not the default group, not in
torch's group registry, alive as long as the mesh is. ``torch.distributed.is_initialized()``
is left as it was. DTensor skips communication on size-1 mesh dimensions, and collectives
that plugins issue on the mesh's group (``mcore.ragged``'s row counts, the optimizers'
gathers and broadcasts) run on the private group. What cannot work without a default group
are the global-rank look-ups of ``torch.distributed`` on it (``get_rank(group)``,
``get_process_group_ranks``, ``get_backend``); the mesh answers rank queries itself instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["LocalMesh", "local_group"]


def local_group(device_type: str) -> ProcessGroup:
    """A 1-rank process group (gloo for CPU tensors, NCCL for CUDA ones) that is not registered
    anywhere: nothing global refers to it, so it goes away with its last reference."""
    store = dist.HashStore()
    group = ProcessGroup(store, 0, 1)
    gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), 0, 1, default_pg_timeout)
    group._register_backend(torch.device("cpu"), ProcessGroup.BackendType.GLOO, gloo)
    default = ProcessGroup.BackendType.GLOO
    if device_type == "cuda":
        nccl = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), 0, 1, dist.ProcessGroupNCCL.Options())
        group._register_backend(torch.device("cuda"), ProcessGroup.BackendType.NCCL, nccl)
        default = ProcessGroup.BackendType.NCCL
    group._set_default_backend(default)
    return group


class LocalMesh(DeviceMesh):
    """A ``DeviceMesh`` of shape ``(1,) * len(dim_names)`` for a process without a process group."""

    def __init__(self, device_type: str, dim_names: tuple[str, ...], *, group: ProcessGroup | None = None) -> None:
        mesh = torch.zeros((1,) * len(dim_names), dtype=torch.int)  # global rank 0 at every coordinate
        super().__init__(device_type, mesh, mesh_dim_names=dim_names, _init_backend=False, _rank=0)
        self._local_group = group if group is not None else local_group(device_type)
        names: list[Any] = [f"mcore_fsdp_local_{d}" for d in dim_names]  # never looked up: get_group answers
        self._dim_group_names = names

    def __getitem__(self, dims: str | tuple[str, ...]) -> DeviceMesh:
        names = (dims,) if isinstance(dims, str) else tuple(dims)
        missing = [d for d in names if d not in (self.mesh_dim_names or ())]
        if missing:
            raise KeyError(f"mesh has no dimension {missing[0]!r}; it has {list(self.mesh_dim_names or ())}")
        return LocalMesh(self.device_type, names, group=self._local_group)

    # Every dimension has one rank, this process; torch would ask the default group.
    def get_group(self, mesh_dim: int | str | None = None) -> ProcessGroup:
        return self._local_group

    def get_all_groups(self) -> list[ProcessGroup]:
        return [self._local_group] * self.ndim

    def get_rank(self) -> int:
        return 0

    def get_local_rank(self, mesh_dim: int | str | None = None) -> int:
        return 0

    # The group is private to this process: a copy elsewhere (pickle) builds its own.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_local_group", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # not DeviceMesh's: it looks our group names up in torch's registry, which never has them
        self.__dict__.update(state)
        self._pg_registry = {}
        self._local_group = local_group(self.device_type)
