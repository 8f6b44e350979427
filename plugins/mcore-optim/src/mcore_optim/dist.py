"""What the optimizers need from torch.distributed: the data-parallel group, DTensor views, collectives.

The data-parallel group comes from the layouts (``layout.data_parallel()``), never from a
global: an optimizer that shards its own work (``distributed-adamw``,
``layerwise-distributed``) shards over the one layout that reports a data-parallel size
above 1. Several such layouts (e.g. replicate x shard) are refused for those optimizers
rather than guessed at; the plain ``adamw`` and ``muon`` need no group (DTensor parameters
carry their own mesh, replicated parameters arrive with averaged gradients).

A ``Shard(0)`` DTensor's rows may be split unevenly, or held whole by one rank
(``mcore.ragged``): DTensor's ``full_tensor`` and ``redistribute`` assume even chunks, so
whatever here makes a tensor whole or takes a rank's rows reads the real row counts
(``counts_of``, one batched all-gather) and never assumes ``torch.chunk``'s split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from mcore import ragged
from mcore.ragged import even_counts

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


def full(value: torch.Tensor, param: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
    """The whole tensor of which ``value`` is this rank's shard, laid out like ``param``.

    A collective under DTensor, ragged row splits included (``mcore.ragged``). ``counts``,
    the parameter's row counts where known (``row_counts``), saves the collective that
    looks them up.
    """
    if not isinstance(param, DTensor):
        return value
    return whole(as_dtensor(value, param), counts)


def as_dtensor(value: torch.Tensor, param: DTensor) -> DTensor:
    """``value`` (this rank's local tensor) as a DTensor laid out like ``param``, no check, no copy."""
    return DTensor.from_local(
        value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def whole(t: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
    """The whole of ``t`` (a collective for a DTensor), whatever its row split; a plain tensor as is.

    ``counts``: ``t``'s row counts (``row_counts``) where known; an even split then takes
    DTensor's own gather and no look-up.
    """
    if not isinstance(t, DTensor):
        return t
    if counts is not None and (not counts or tuple(counts) == even_counts(t.shape[0], len(counts))):
        return t.full_tensor()
    return ragged.full_tensor(t)


def counts_of(tensors: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    """``mcore.ragged.row_counts`` of the DTensors among ``tensors`` (``()`` for the rest and for
    layouts that are not row splits). A collective when any is a DTensor: every rank must pass
    the same tensors in the same order."""
    at = [i for i, t in enumerate(tensors) if ragged.row_dim(t) is not None]
    out: list[tuple[int, ...]] = [() for _ in tensors]
    if at:
        for i, c in zip(at, ragged.row_counts([tensors[i] for i in at])):  # type: ignore[misc]
            out[i] = c
    return out


def held_whole_by(counts: Sequence[int]) -> int | None:
    """The one rank that holds every row, from a tensor's row counts (None: split, or no rows)."""
    nonzero = [r for r, c in enumerate(counts) if c]
    return nonzero[0] if len(nonzero) == 1 else None


def rows_of(value: torch.Tensor, param: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """This rank's piece of ``value``, a whole tensor, laid out like ``param`` (no communication).

    ``counts``: ``param``'s row counts (``counts_of``); for a row split this rank keeps its
    real rows, for other DTensor layouts DTensor's own piece.
    """
    if not isinstance(param, DTensor):
        return value
    dim = ragged.row_dim(param)
    if dim is None or not counts:
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)._local_tensor
    r = param.device_mesh.get_local_rank(dim)
    lo = sum(counts[:r])
    return value[lo : lo + counts[r]]


def shard_of(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard (as laid out in ``param``) of ``value``, a DTensor or a full tensor.

    Collective when either is a DTensor (see ``shards_of``).
    """
    return shards_of([value], [param])[0]


def shards_of(values: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each value's piece as its parameter lays it out, by the parameter's real row split.

    A value that is a DTensor on the parameter's mesh, with its placements and its row counts
    on every rank, is already this rank's piece: its local tensor. Any other value is made
    whole (gathered if a DTensor) and this rank keeps its rows of it. Whether a value may be
    kept as is can only be decided with every rank's row counts (a local shape that matches
    here may hold other rows), so the counts of all values and parameters are looked up in one
    batched collective: every rank must pass the same values and parameters in the same order.
    """
    assert len(values) == len(params)
    counts = counts_of([*values, *params])
    value_counts, param_counts = counts[: len(values)], counts[len(values) :]
    out = []
    for value, param, vc, pc in zip(values, params, value_counts, param_counts):
        if (
            isinstance(value, DTensor)
            and isinstance(param, DTensor)
            and value.device_mesh == param.device_mesh
            and tuple(value.placements) == tuple(param.placements)
            and vc == pc
            and tuple(value.shape) == tuple(param.shape)
        ):
            out.append(value._local_tensor)
            continue
        out.append(rows_of(whole(value, vc), param, pc))
    return out


def all_gather_flat(output: torch.Tensor, chunk: torch.Tensor, group: Any) -> None:
    """``output`` (size x len(chunk)) <- every rank's ``chunk``, in rank order."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, chunk, group=group)


def reduce_scatter_flat(output: torch.Tensor, full_input: torch.Tensor, group: Any) -> None:
    """``output`` <- this rank's chunk of the sum of every rank's ``full_input``."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, full_input, op=dist.ReduceOp.SUM, group=group)


def row_sharded(param: torch.Tensor) -> bool:
    """True for a DTensor sharded by rows (``Shard(0)``) over a 1-D mesh, FSDP's layout, with any
    row counts (even chunks, or ragged: see ``mcore.ragged``; ``gather_rows`` and ``scatter_rows``
    take the real counts)."""
    from torch.distributed.tensor import Shard

    return isinstance(param, DTensor) and param.device_mesh.ndim == 1 and tuple(param.placements) == (Shard(0),)


def gather_rows(
    piece: torch.Tensor,
    rows: int,
    owner: int,
    group: Any,
    rank: int,
    size: int,
    counts: Sequence[int] | None = None,
) -> torch.Tensor | None:
    """Row shards of a ``rows``-row tensor, gathered whole on ``owner`` only.

    ``counts``: every rank's row count, in rank order (default: ``torch.chunk``'s even
    split). Shards are padded to the largest one for the collective. Returns the whole
    tensor on ``owner``, None elsewhere.
    """
    counts = tuple(counts) if counts is not None else even_counts(rows, size)
    assert len(counts) == size and sum(counts) == rows and piece.shape[0] == counts[rank], (counts, piece.shape)
    most = max(counts)
    padded = piece.new_zeros((most, *piece.shape[1:]))
    padded[: piece.shape[0]].copy_(piece)
    if rank != owner:
        dist.gather(padded, None, group=group, group_dst=owner)
        return None
    pieces = [torch.empty_like(padded) for _ in range(size)]
    dist.gather(padded, pieces, group=group, group_dst=owner)
    return torch.cat([p[:n] for p, n in zip(pieces, counts)])


def scatter_rows(
    whole: torch.Tensor | None,
    like: torch.Tensor,
    dtype: torch.dtype,
    rows: int,
    owner: int,
    group: Any,
    rank: int,
    size: int,
    counts: Sequence[int] | None = None,
) -> torch.Tensor:
    """This rank's row shard of ``whole`` (``dtype``), which ``owner`` holds.

    ``counts``: every rank's row count, in rank order (default: ``torch.chunk``'s even
    split). ``like`` gives the trailing shape and the device.
    """
    counts = tuple(counts) if counts is not None else even_counts(rows, size)
    assert len(counts) == size and sum(counts) == rows, (counts, rows)
    most = max(counts)
    out = torch.empty((most, *like.shape[1:]), dtype=dtype, device=like.device)
    pieces = None
    if rank == owner:
        assert whole is not None
        padded = whole.new_zeros((size, most, *whole.shape[1:]))  # (ranks, most rows, ...)
        lo = 0
        for r, n in enumerate(counts):
            padded[r, :n].copy_(whole[lo : lo + n])
            lo += n
        pieces = list(padded.unbind(0))
    dist.scatter(out, pieces, group=group, group_src=owner)
    return out[: counts[rank]]
