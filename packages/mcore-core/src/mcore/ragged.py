"""Row-ragged ``Shard(0)`` DTensors: the real split of a parameter's rows, for every plugin.

``DTensor`` assumes even chunking along a ``Shard(0)`` mesh dimension: ``ceil(d0 / N)`` rows
per rank, in rank order. Layouts may split rows differently: ``fsdp`` can keep a parameter
whole on one rank (Muon needs whole matrices; block-scaled formats need whole blocks), so
one rank holds all ``d0`` rows and the others none. Such a tensor is still a ``DTensor``
with ``Shard(0)`` placement whose local tensors, concatenated along dim 0 in the rank order
of that mesh dimension, are the whole tensor; only the per-rank row counts differ from
DTensor's. Element-wise work (optimizers, clipping, norms) is unaffected; what needs the
real split is handled here:

* ``row_counts``: every rank's row count of each tensor (one small all-gather per group);
* ``full_tensor``: the whole tensor, ragged or not;
* ``annotate_for_checkpoint``: the chunk metadata ``torch.distributed.checkpoint`` writes
  and reads for ragged tensors (DCP otherwise assumes even chunks).

Only the ``(Shard(0),)`` and ``(Replicate(), Shard(0))`` (HSDP) placements are ragged-aware;
other DTensors pass through to DTensor's own behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = ["annotate_for_checkpoint", "even_counts", "full_tensor", "row_counts", "row_dim"]

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def row_dim(t: Any) -> int | None:
    """The mesh dimension that splits ``t``'s rows, for a ragged-aware DTensor; else ``None``."""
    if not isinstance(t, DTensor) or t.dim() == 0:
        return None
    placements = tuple(t.placements)
    shards = [i for i, p in enumerate(placements) if p != Replicate()]
    if len(shards) != 1 or placements[shards[0]] != Shard(0):
        return None
    return shards[0]


def even_counts(rows: int, world: int) -> tuple[int, ...]:
    """DTensor's own split: ``ceil(rows / world)`` rows per rank, the last ones fewer or none."""
    per = -(-rows // world)
    return tuple(max(0, min(per, rows - r * per)) for r in range(world))


def row_counts(tensors: Sequence[DTensor]) -> list[tuple[int, ...]]:
    """For each tensor, the row count of every rank along its row-splitting mesh dimension.

    A collective over each distinct group: every rank of those groups must call it with the
    same tensors in the same order. Tensors without a ragged-aware placement get ``()``.
    """
    out: list[tuple[int, ...]] = [() for _ in tensors]
    by_group: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        dim = row_dim(t)
        if dim is None:
            continue
        group = t.device_mesh.get_group(dim)
        by_group.setdefault(group, []).append(i)
    for group, indices in by_group.items():
        world = dist.get_world_size(group)
        first = tensors[indices[0]]
        # the mesh's device: a shard built on the meta device (meta-device construction) holds no data
        device = (
            first.to_local().device if not first.to_local().is_meta else torch.device(first.device_mesh.device_type)
        )
        mine = torch.tensor([tensors[i].to_local().shape[0] for i in indices], dtype=torch.int64, device=device)
        every = torch.empty(world * len(indices), dtype=torch.int64, device=device)
        _all_gather(every, mine, group=group)
        table = every.view(world, len(indices)).tolist()  # (ranks, tensors)
        for j, i in enumerate(indices):
            counts = tuple(int(table[r][j]) for r in range(world))
            if sum(counts) != tensors[i].shape[0]:
                raise ValueError(
                    f"a Shard(0) DTensor of shape {tuple(tensors[i].shape)} has {sum(counts)} rows over its ranks "
                    f"({counts}); allowed: local row counts that add up to the global rows"
                )
            out[i] = counts
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for DTensors); a ragged split is gathered correctly."""
    if not isinstance(t, DTensor):
        return t.detach().clone()
    dim = row_dim(t)
    if dim is None:
        return _waited(t.full_tensor())
    # one kind of collective, issued and finished here, even for an even split: DTensor's own gather is a
    # functional (async) collective that a rank may leave in flight while it enters the next tensor's
    # ``row_counts``, and gloo was seen to hang on that mix
    (counts,) = row_counts([t])
    local = t.to_local()
    most = max(counts)
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = local.new_empty((len(counts) * most, *local.shape[1:]))
    _all_gather(gathered, padded, group=t.device_mesh.get_group(dim))
    pieces = [gathered[r * most : r * most + n] for r, n in enumerate(counts) if n]
    return torch.cat(pieces) if pieces else local.new_empty((0, *local.shape[1:]))


def _waited(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its collective finished (DTensor answers an ``AsyncCollectiveTensor`` that waits on first use)."""
    wait = getattr(t, "wait", None)
    return wait() if callable(wait) else t


def _chunk(t: DTensor, counts: tuple[int, ...], rank: int) -> ChunkStorageMetadata:
    local = t.to_local()
    offsets = (sum(counts[:rank]),) + (0,) * (t.dim() - 1)
    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=local.shape)


def _annotate(t: DTensor, chunk: ChunkStorageMetadata) -> None:
    """Make DCP use ``chunk`` for ``t`` (DTensor defers to these methods of its local tensor)."""
    local = t._local_tensor
    empty = local.numel() == 0

    def chunk_list() -> list[ChunkStorageMetadata]:
        return [] if empty else [chunk]

    def write_items(fqn: str, obj: Any) -> list[WriteItem]:
        if empty:
            return []
        data = TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(local), size=t.size())
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD, tensor_data=data)]

    local.__create_chunk_list__ = chunk_list  # type: ignore[attr-defined]
    local.__create_write_items__ = write_items  # type: ignore[attr-defined]


def annotate_for_checkpoint(tensors: Mapping[str, Any] | Iterable[Any]) -> int:
    """Give every ragged DTensor among ``tensors`` (values of a flat state dict, or a list) the
    chunk metadata DCP needs to save or load it. Collective (see ``row_counts``). Returns how
    many tensors were ragged."""
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    dtensors = [t for t in values if row_dim(t) is not None]
    ragged = 0
    for t, counts in zip(dtensors, row_counts(dtensors)):
        if counts == even_counts(t.shape[0], len(counts)):
            continue
        dim = row_dim(t)
        assert dim is not None
        _annotate(t, _chunk(t, counts, t.device_mesh.get_local_rank(dim)))
        ragged += 1
    return ragged
