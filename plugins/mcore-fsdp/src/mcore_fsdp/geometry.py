"""Where each parameter of a unit lives in the flat sharded and un-sharded buffers.

Two placements, chosen per parameter:

* **rows** (``Shard(0)``, FSDP2's): ``rows = ceil(d0 / N)`` rows per rank, the last ranks
  holding fewer (or none); the parameter takes ``rows * row_numel`` elements (its padded
  chunk) at the same offset of every rank's flat shard.
* **whole**: the parameter stays whole on one rank (its *owner*), for optimizers that need
  whole matrices (Muon) and formats whose blocks must not be cut. Whole parameters are
  bin-packed over the ranks (largest first onto the least loaded rank) and take ``numel``
  elements at an offset of their owner's shard only.

Each rank's shard of the unit is one flat buffer of ``S`` elements. Parameters are laid out
in groups (plain, then those gathered in a precision recipe's own format), each group's
row-split parameters first and then its whole ones, so the plain all-gather covers one
prefix ``[:plain_numel]``. Gathering the N flat shards gives an ``(N, S)`` buffer; the
un-sharded (copied-out) buffer holds each parameter at ``full_offset``: a row-split one as
its padded full tensor ``(N * rows, *shape[1:])`` (first ``d0`` rows are the parameter), a
whole one as itself. A parameter whose gathered form is not a high-precision tensor (a precision
recipe's ``QuantizedWeight``, handed to its GEMM as the gathered bytes) takes no room there
(``buffered`` false): the un-sharded buffer holds only what is copied into it. Reduce-scatter
uses the same ``(N, S)`` layout in reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod


@dataclass(frozen=True, slots=True)
class Slot:
    """One parameter's place in the unit's buffers (sizes in elements)."""

    shape: tuple[int, ...]
    rows: int  # rows per rank: ceil(shape[0] / N) when row-split; shape[0] when whole
    row_numel: int  # prod(shape[1:])
    offset: int  # start inside a rank's flat shard (the owner's, when whole)
    full_offset: int  # start inside the un-sharded (copied-out) buffer
    owner: int | None = None  # None: rows split over the ranks; r: whole on rank r
    buffered: bool = True  # False: no room in the un-sharded buffer (gathered as a QuantizedWeight)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def whole(self) -> bool:
        return self.owner is not None

    @property
    def chunk_numel(self) -> int:
        """Elements this parameter takes in a rank's shard (padded chunk, or the whole tensor)."""
        return self.rows * self.row_numel

    def local_rows(self, rank: int) -> int:
        """Rows rank ``rank`` really holds."""
        if self.owner is not None:
            return self.shape[0] if rank == self.owner else 0
        return max(0, min(self.rows, self.shape[0] - rank * self.rows))

    def local_numel(self, rank: int) -> int:
        return self.local_rows(rank) * self.row_numel

    def row_start(self, rank: int) -> int:
        """First row of the parameter that rank ``rank`` holds."""
        return 0 if self.owner is not None else min(rank * self.rows, self.shape[0])

    def full_numel(self, world: int) -> int:
        """Elements in the un-sharded buffer (padded to ``world * rows`` rows when row-split; 0 when not
        ``buffered``)."""
        if not self.buffered:
            return 0
        return self.numel if self.owner is not None else world * self.chunk_numel


@dataclass(frozen=True, slots=True)
class Geometry:
    slots: tuple[Slot, ...]
    world: int
    shard_numel: int  # S
    plain_numel: int  # the prefix of every shard that the plain all-gather moves
    full_numel: int  # elements of the un-sharded buffer
    loads: tuple[int, ...]  # elements each rank really stores (padding excluded)
    #: (rank, start, end): stretches of a rank's shard after its whole parameters, up to the
    #: end of the group's whole region (no parameter there; zero in reduce-scatter inputs)
    whole_padding: tuple[tuple[int, int, int], ...] = ()

    def padding(self, rank: int) -> int:
        """Elements of rank ``rank``'s shard that hold no parameter."""
        return self.shard_numel - self.loads[rank]


def plan(
    shapes: Sequence[tuple[int, ...]],
    world: int,
    *,
    whole: Sequence[bool] | None = None,
    groups: Sequence[int] | None = None,
    buffered: Sequence[bool] | None = None,
) -> Geometry:
    """Lay out parameters for ``world`` shards, in the given order within each group.

    ``whole[i]``: keep parameter ``i`` whole on one rank; ``groups[i]``: 0 for the plain
    all-gather, 1 for parameters gathered in their own format (they go last); ``buffered[i]``
    false: parameter ``i`` takes no room in the un-sharded buffer (module docstring).
    """
    n = len(shapes)
    whole = list(whole) if whole is not None else [False] * n
    groups = list(groups) if groups is not None else [0] * n
    buffered = list(buffered) if buffered is not None else [True] * n
    for shape in shapes:
        if len(shape) == 0:
            raise ValueError(
                "fully_shard: 0-dim parameters cannot be sharded along dim 0; allowed: tensors of >= 1 dim"
            )
    slots: list[Slot | None] = [None] * n
    loads = [0] * world
    padding: list[tuple[int, int, int]] = []
    offset = 0
    plain_numel = 0
    for group in sorted(set(groups)):
        members = [i for i in range(n) if groups[i] == group]
        for i in (i for i in members if not whole[i]):
            rows = -(-shapes[i][0] // world)
            slots[i] = Slot(
                shape=tuple(shapes[i]), rows=rows, row_numel=prod(shapes[i][1:]), offset=offset, full_offset=0
            )
            offset += rows * prod(shapes[i][1:])
            for r in range(world):
                loads[r] += slots[i].local_numel(r)  # type: ignore[union-attr]
        # whole parameters, in the given order (callers give them largest first), each onto
        # the least loaded rank (ties: lowest rank)
        used = [0] * world
        for i in (i for i in members if whole[i]):
            owner = min(range(world), key=lambda r: (loads[r], r))
            numel = prod(shapes[i])
            slots[i] = Slot(
                shape=tuple(shapes[i]),
                rows=shapes[i][0],
                row_numel=prod(shapes[i][1:]),
                offset=offset + used[owner],
                full_offset=0,
                owner=owner,
            )
            used[owner] += numel
            loads[owner] += numel
        end = offset + max(used)
        padding += [(r, offset + used[r], end) for r in range(world) if used[r] < max(used)]
        offset = end
        if group == 0:
            plain_numel = offset
    # the un-sharded buffer: every parameter one after another, in the unit's order
    full = 0
    placed: list[Slot] = []
    for slot, keep in zip(slots, buffered):
        assert slot is not None
        placed.append(
            Slot(
                shape=slot.shape,
                rows=slot.rows,
                row_numel=slot.row_numel,
                offset=slot.offset,
                full_offset=full,
                owner=slot.owner,
                buffered=keep,
            )
        )
        full += placed[-1].full_numel(world)
    if 0 not in groups:
        plain_numel = 0
    return Geometry(
        slots=tuple(placed),
        world=world,
        shard_numel=offset,
        plain_numel=plain_numel,
        full_numel=full,
        loads=tuple(loads),
        whole_padding=tuple(padding),
    )
