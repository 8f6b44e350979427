"""Where each parameter of a unit lives in the flat sharded and un-sharded buffers.

A unit's parameters are sharded along dim 0 exactly as ``DTensor`` ``Shard(0)`` does:
``rows = ceil(d0 / N)`` rows per rank, the last ranks holding fewer (or none). Each rank's
shard of the unit is one flat buffer of ``S`` elements: the parameters' padded chunks
(``rows * row_numel`` each) one after another. Gathering the N flat shards gives an
``(N, S)`` buffer; copying the columns of parameter ``i`` out gives its padded full tensor
``(N * rows, *shape[1:])``, whose first ``d0`` rows are the parameter. Reduce-scatter uses
the same ``(N, S)`` layout in reverse (``torch._chunk_cat`` of the gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True, slots=True)
class Slot:
    """One parameter's place in the unit's buffers (sizes in elements)."""

    shape: tuple[int, ...]
    rows: int  # rows per rank: ceil(shape[0] / N)
    row_numel: int  # prod(shape[1:])
    offset: int  # start of this parameter's chunk inside a rank's flat shard

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def chunk_numel(self) -> int:
        """Padded elements per rank."""
        return self.rows * self.row_numel

    def local_rows(self, rank: int) -> int:
        """Rows rank ``rank`` really holds (``Shard(0)`` chunk semantics)."""
        return max(0, min(self.rows, self.shape[0] - rank * self.rows))

    def local_numel(self, rank: int) -> int:
        return self.local_rows(rank) * self.row_numel

    def full_offset(self, world: int) -> int:
        """Start of this parameter in the un-sharded (copied-out) buffer of ``world * S``."""
        return world * self.offset


@dataclass(frozen=True, slots=True)
class Geometry:
    slots: tuple[Slot, ...]
    world: int
    shard_numel: int  # S

    @property
    def full_numel(self) -> int:
        return self.world * self.shard_numel


def plan(shapes: list[tuple[int, ...]], world: int) -> Geometry:
    """Lay out parameters of the given shapes for ``world`` shards (dim-0 chunks, in order)."""
    slots = []
    offset = 0
    for shape in shapes:
        if len(shape) == 0:
            raise ValueError(
                "fully_shard: 0-dim parameters cannot be sharded along dim 0; allowed: tensors of >= 1 dim"
            )
        rows = -(-shape[0] // world)
        slot = Slot(shape=tuple(shape), rows=rows, row_numel=prod(shape[1:]), offset=offset)
        slots.append(slot)
        offset += slot.chunk_numel
    return Geometry(slots=tuple(slots), world=world, shard_numel=offset)
