"""The run's device mesh: named parallel dimensions over the launched processes.

``build_mesh`` turns ``[parallel]`` sizes into a ``ParallelMesh``. With one process and no
``torchrun`` environment it needs no process group at all; otherwise it initialises
``torch.distributed`` (NCCL on GPU, gloo on CPU) from the ``torchrun`` environment and
builds a ``torch.distributed.device_mesh.DeviceMesh``. No launcher of our own: multi-process
and multi-node runs come from ``torchrun``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from math import prod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

#: Outer-to-inner order of the known dimensions (tp innermost: fastest links).
CANONICAL_DIM_ORDER: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "cp", "ep", "tp")


@dataclass(frozen=True)
class ParallelMesh:
    """Named mesh dimensions, their sizes, and (when distributed) the ``DeviceMesh``.

    ``device_mesh`` is ``None`` exactly when ``world_size == 1`` and no process group was
    initialised; every query still answers (rank 0, size 1, group ``None``).
    """

    dim_names: tuple[str, ...]
    dim_sizes: tuple[int, ...]
    device_type: str
    device_mesh: DeviceMesh | None = None
    _local_index: int = field(default=0, repr=False)

    @property
    def world_size(self) -> int:
        return prod(self.dim_sizes) if self.dim_sizes else 1

    def has(self, dim: str) -> bool:
        return dim in self.dim_names

    def size(self, dim: str) -> int:
        """Size of ``dim``; 1 for a dimension the mesh does not have."""
        if dim not in self.dim_names:
            return 1
        return self.dim_sizes[self.dim_names.index(dim)]

    def rank(self, dim: str) -> int:
        """This process's coordinate along ``dim``; 0 for an absent or trivial dimension."""
        if self.device_mesh is None or dim not in self.dim_names:
            return 0
        return int(self.device_mesh.get_local_rank(dim))

    def group(self, dim: str) -> ProcessGroup | None:
        """The process group along ``dim``, ``None`` when that dimension has size 1."""
        if self.device_mesh is None or self.size(dim) == 1:
            return None
        return self.device_mesh.get_group(dim)

    def submesh(self, dims: Sequence[str]) -> DeviceMesh | None:
        """The ``DeviceMesh`` over ``dims`` (flattened if several), or ``None`` if undistributed."""
        if self.device_mesh is None:
            return None
        missing = [d for d in dims if d not in self.dim_names]
        if missing:
            raise ValueError(f"mesh has no dimension {missing[0]!r}; it has {list(self.dim_names)}")
        if len(dims) == 1:
            return self.device_mesh[dims[0]]
        return self.device_mesh[tuple(dims)]

    @property
    def device(self) -> torch.device:
        import torch

        if self.device_type == "cuda":
            return torch.device("cuda", self._local_index)
        return torch.device(self.device_type)


def order_dims(owned: Sequence[str]) -> list[str]:
    """Known dimensions in canonical order, then unknown ones (plugin-defined) before ``tp``."""
    known = [d for d in CANONICAL_DIM_ORDER if d in owned]
    custom = [d for d in owned if d not in CANONICAL_DIM_ORDER]
    if "tp" in known:
        known.remove("tp")
        return known + custom + ["tp"]
    return known + custom


def resolve_sizes(
    dims: Sequence[str], sizes: Mapping[str, int], world_size: int, *, fill: str | None
) -> dict[str, int]:
    """Give every owned dimension a size so that their product is ``world_size``.

    ``sizes`` may leave a dimension out or set it to -1; at most one dimension is then
    inferred (``fill`` is the default one to infer, normally the data-parallel dimension).
    """
    unknown = [d for d in sizes if d not in dims]
    if unknown:
        raise ValueError(
            f"parallel.sizes names dimension {unknown[0]!r}, which no chosen layout owns; "
            f"the layouts own {list(dims) or 'no dimension'}"
        )
    resolved: dict[str, int] = {}
    open_dims = []
    for d in dims:
        value = sizes.get(d, -1 if d == fill else 1)
        if value == -1:
            open_dims.append(d)
        elif not isinstance(value, int) or value < 1:
            raise ValueError(f"parallel.sizes.{d} = {value!r}; allowed: a positive int, or -1 to fill")
        resolved[d] = value
    if len(open_dims) > 1:
        raise ValueError(f"parallel.sizes: at most one dimension may be -1, got {open_dims}")
    fixed = prod(v for d, v in resolved.items() if d not in open_dims)
    if open_dims:
        if world_size % fixed:
            raise ValueError(
                f"parallel sizes { ({d: v for d, v in resolved.items() if d not in open_dims}) } "
                f"multiply to {fixed}, which does not divide the world size {world_size}; "
                "choose sizes whose product divides the number of processes"
            )
        resolved[open_dims[0]] = world_size // fixed
    elif fixed != world_size:
        raise ValueError(
            f"parallel sizes {resolved} multiply to {fixed} but the world size is {world_size}; "
            "their product must equal the number of processes"
            + (" (add a data-parallel layout such as 'ddp' or 'fsdp' to use more processes)" if not dims else "")
        )
    return resolved


def world_from_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the torchrun environment (or an initialised group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def check_cuda_device(local_rank: int) -> None:
    """A ``ConfigError`` (one line) unless torch sees a CUDA device for this process."""
    import torch

    from mcore.errors import ConfigError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"parallel.device = 'cuda', but torch {torch.__version__} ({build}) sees no CUDA device here; "
            "use --parallel.device=cpu (or auto)"
        )
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK = {local_rank}, but this machine has {count} CUDA device(s); "
            f"start at most {count} processes per node (torchrun --nproc-per-node={count})"
        )


def build_mesh(
    owned_dims: Sequence[str],
    sizes: Mapping[str, int] | None = None,
    *,
    fill: str | None = None,
    device_type: str | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
    check: Callable[[torch.device], None] | None = None,
) -> ParallelMesh:
    """Initialise the process group if needed and build the run's ``ParallelMesh``.

    ``check(device)`` runs on every rank once the default process group exists and before the mesh is sized or any
    of its groups is created: the run compares the ranks' configs there (``check_same_config``), because ranks whose
    layouts or sizes differ would otherwise create different groups and wait in ``new_group`` until the timeout.

    ``device_type`` defaults to ``cuda`` when available, else ``cpu``; ``backend`` defaults
    to NCCL on CUDA and gloo on CPU. ``timeout_s`` (``[parallel] timeout_s``) bounds every
    collective of the default group (when this call creates it) and of each mesh dimension's
    group, which are then created here rather than by ``init_device_mesh`` (whose groups
    would get torch's default timeout); ``None`` keeps torch's defaults.
    """
    import torch
    import torch.distributed as dist

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank, world_size = world_from_env()
    dims = order_dims(owned_dims)
    if device_type == "cuda":
        check_cuda_device(local_rank)
        torch.cuda.set_device(local_rank)
    if world_size == 1 and not dist.is_initialized():
        resolved = resolve_sizes(dims, sizes or {}, world_size, fill=fill)
        return ParallelMesh(tuple(dims), tuple(resolved[d] for d in dims), device_type, None, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if device_type == "cuda" else "gloo"),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s) if timeout_s is not None else None,
        )
    if check is not None:
        check(torch.device("cuda", local_rank) if device_type == "cuda" else torch.device(device_type))
    resolved = resolve_sizes(dims, sizes or {}, world_size, fill=fill)  # the same on every rank once checked
    names = tuple(dims)
    shape = tuple(resolved[d] for d in names)
    from torch.distributed.device_mesh import init_device_mesh

    if not names:  # a layout set owning no dimension, launched on one process
        return ParallelMesh((), (), device_type, None, local_rank)
    if timeout_s is None:
        device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    else:
        device_mesh = mesh_with_timeout(device_type, shape, names, timedelta(seconds=timeout_s))
    return ParallelMesh(names, shape, device_type, device_mesh, local_rank)


def mesh_with_timeout(
    device_type: str, shape: tuple[int, ...], names: tuple[str, ...], timeout: timedelta
) -> DeviceMesh:
    """The ``DeviceMesh`` ``init_device_mesh`` would build (ranks laid out row-major over
    ``shape``), from groups created with ``timeout``: one group per line of ranks along each
    dimension. Every rank creates every group, in the same order, as ``new_group`` requires."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.arange(prod(shape)).reshape(shape)  # (d0, d1, ...): global rank at each coordinate
    me = dist.get_rank()
    mine = []
    for i in range(len(shape)):
        lines = ranks.movedim(i, -1).reshape(-1, shape[i])  # (world / d_i, d_i): one group per row
        for line in lines.tolist():
            group = dist.new_group(ranks=line, timeout=timeout)
            if me in line:
                mine.append(group)
    return DeviceMesh.from_group(mine, device_type, mesh=ranks, mesh_dim_names=names)


def describe(mesh: ParallelMesh) -> dict[str, Any]:
    """A JSON-friendly summary of the mesh (for logs and ``mcore config``)."""
    return {"world_size": mesh.world_size, "device_type": mesh.device_type, **dict(zip(mesh.dim_names, mesh.dim_sizes))}
