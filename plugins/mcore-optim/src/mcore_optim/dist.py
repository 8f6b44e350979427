"""What the optimizers need from torch.distributed: the data-parallel group, DTensor views, collectives.

The data-parallel group comes from the layouts (``layout.data_parallel()``), never from a
global: an optimizer that shards its own work (``distributed-adamw``,
``layerwise-distributed``) shards over the one layout that reports a data-parallel size
above 1. Several such layouts (e.g. replicate x shard) are refused for those optimizers
rather than guessed at; the plain ``adamw`` and ``muon`` need no group (DTensor parameters
carry their own mesh, replicated parameters arrive with averaged gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

if TYPE_CHECKING:
    from mcore.protocols.layout import DataParallelInfo, ParallelLayout


def data_parallel(layouts: Sequence[ParallelLayout], *, optimizer: str) -> DataParallelInfo:
    """The single data-parallel position this optimizer shards over (size 1 when there is none)."""
    from mcore.protocols.layout import DataParallelInfo

    infos = [(type(layout).__name__, layout.data_parallel()) for layout in layouts]
    split = [(name, info) for name, info in infos if info.size > 1]
    if not split:
        return DataParallelInfo(rank=0, size=1, group=None)
    if len(split) > 1:
        raise ValueError(
            f"optimizer {optimizer!r} shards over one data-parallel group, but layouts "
            f"{[name for name, _ in split]} each report a data-parallel size above 1; "
            "allowed: at most one data-parallel layout (use 'adamw' or 'muon' for composed layouts)"
        )
    info = split[0][1]
    if info.group is None:
        raise ValueError(
            f"layout {split[0][0]} reports data-parallel size {info.size} but no process group; "
            "a data-parallel layout must return its group from data_parallel()"
        )
    return info


def is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard (a view: in-place ops reach the parameter)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap a local state tensor as a DTensor laid out like ``param`` (plain tensors pass through)."""
    if not isinstance(param, DTensor):
        return value
    return DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def full(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``value`` is this rank's shard (a collective under DTensor)."""
    if not isinstance(param, DTensor):
        return value
    whole: DTensor = DTensor.from_local(
        value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )
    return whole.full_tensor()


def shard_of(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard (as laid out in ``param``) of ``value``, a DTensor or a full tensor.

    No communication for a full tensor: every rank holds it and keeps its own piece.
    """
    if not isinstance(param, DTensor):
        return value.full_tensor() if isinstance(value, DTensor) else value
    if isinstance(value, DTensor):
        return value.redistribute(param.device_mesh, param.placements)._local_tensor
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)._local_tensor


def all_gather_flat(output: torch.Tensor, chunk: torch.Tensor, group: Any) -> None:
    """``output`` (size x len(chunk)) <- every rank's ``chunk``, in rank order."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, chunk, group=group)


def reduce_scatter_flat(output: torch.Tensor, full_input: torch.Tensor, group: Any) -> None:
    """``output`` <- this rank's chunk of the sum of every rank's ``full_input``."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, full_input, op=dist.ReduceOp.SUM, group=group)


def row_sharded(param: torch.Tensor) -> bool:
    """True for a DTensor sharded by rows (``Shard(0)``) over a 1-D mesh, FSDP's layout."""
    from torch.distributed.tensor import Shard

    return isinstance(param, DTensor) and param.device_mesh.ndim == 1 and tuple(param.placements) == (Shard(0),)


def gather_rows(piece: torch.Tensor, rows: int, owner: int, group: Any, rank: int, size: int) -> torch.Tensor | None:
    """Row shards (``torch.chunk`` sizes) of a ``rows``-row tensor, gathered whole on ``owner`` only.

    Shards are padded to the largest one for the collective. Returns the whole tensor on
    ``owner``, None elsewhere.
    """
    chunk = -(-rows // size)
    padded = piece.new_zeros((chunk, *piece.shape[1:]))
    padded[: piece.shape[0]].copy_(piece)
    if rank != owner:
        dist.gather(padded, None, group=group, group_dst=owner)
        return None
    pieces = [torch.empty_like(padded) for _ in range(size)]
    dist.gather(padded, pieces, group=group, group_dst=owner)
    return torch.cat(pieces)[:rows]


def scatter_rows(
    whole: torch.Tensor | None,
    like: torch.Tensor,
    dtype: torch.dtype,
    rows: int,
    owner: int,
    group: Any,
    rank: int,
    size: int,
) -> torch.Tensor:
    """This rank's row shard (``torch.chunk`` rows) of ``whole`` (``dtype``), which ``owner`` holds.

    ``like`` gives the trailing shape and the device.
    """
    chunk = -(-rows // size)
    out = torch.empty((chunk, *like.shape[1:]), dtype=dtype, device=like.device)
    pieces = None
    if rank == owner:
        assert whole is not None
        padded = whole.new_zeros((chunk * size, *whole.shape[1:]))
        padded[:rows].copy_(whole)
        pieces = list(padded.chunk(size))
    dist.scatter(out, pieces, group=group, group_src=owner)
    return out[: max(0, min(chunk, rows - rank * chunk))]
