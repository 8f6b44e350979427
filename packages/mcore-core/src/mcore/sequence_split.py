"""A sequence split over ranks, as a recurrent block sees it: the whole sequence for a share of its heads.

Why: context parallelism gives each rank of a group some tokens of every row. Attention passes keys between
the ranks; a recurrent mixer (GDN, Mamba) cannot: its state runs token after token along each document. So the
block does what DeepSpeed-Ulysses does for attention: after its input projections (this rank's tokens, every
channel), ``to_full_sequence`` (an all-to-all over the group) gives each rank EVERY token of the rows, in their
natural order, for its ``1 / size`` share of the channels (whole heads when the heads divide by ``size``); the
block runs its conv and recurrence on that with the full rows' documents (``full_context``), and
``to_local_tokens`` (the inverse all-to-all) gives back this rank's tokens with every channel, before the
output projection. Both are differentiable: the backward of each is the other's all-to-all.

The layout that splits the sequence (``cp``) makes one per micro-batch and hands it to the blocks as
``BlockContext.sequence_split``; a block reads it only if it declares ``supports_sequence_split = True``
(layouts refuse recurrent blocks that do not). Plugins never import each other, so this seam lives in the
core; a block never calls ``torch.distributed`` itself.

Shape legend: R rows of the full batch (1 for a flattened plan), T tokens per full row, L tokens per row on
one rank (padding included), P = size ranks, C channels of one tensor (every rank's), c = C / P.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mcore.errors import UserError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from mcore.protocols.block import BlockContext

__all__ = ["SequenceSplit"]


class _AllToAll(torch.autograd.Function):
    """``(P, ...)``: part ``j`` goes to rank ``j``, part ``j`` of the result came from rank ``j``. Equal parts
    make it its own inverse, so the backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx: Any, parts: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _exchange(parts, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _exchange(grad, ctx.group), None


def _exchange(parts: torch.Tensor, group: Any) -> torch.Tensor:
    send = parts.contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


@dataclass(frozen=True, kw_only=True, eq=False)
class SequenceSplit:
    """The rows of a micro-batch split by tokens over ``group`` (module docstring).

    Attributes:
        group: the ranks that hold the parts of the rows (their group order is the order of ``index``).
        index: ``(R, P * L)`` int64, the place in its full row of every rank's tokens, rank 0's ``L`` first,
            then rank 1's, ...; ``-1`` for padding. Every place ``0 .. T - 1`` of a row appears exactly once.
        seq_len: ``T``, the tokens of a full row.
        positions: ``(R, T)`` int64 positions of the full rows (``BlockContext.positions``' meaning).
        cu_seqlens: ``(D + 1,)`` int32 documents over the flattened full rows (``None``: one per row).
        max_seqlen: the longest document of ``cu_seqlens`` (a host int), or ``None``.
    """

    group: ProcessGroup
    index: torch.Tensor
    seq_len: int
    positions: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    size: int = field(init=False)
    rank: int = field(init=False)
    _source: torch.Tensor = field(init=False, repr=False)  # (R, T): each full-row token's place in ``index``

    def __post_init__(self) -> None:
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        rows, width = self.index.shape
        if width % size:
            raise ValueError(f"SequenceSplit.index has {width} tokens per row for {size} ranks: must divide")
        index = self.index.to(torch.int64)
        real = index >= 0
        if int(real.sum()) != rows * self.seq_len:
            raise ValueError(
                f"SequenceSplit.index holds {int(real.sum())} real tokens for {rows} rows of seq_len {self.seq_len}"
            )
        places = torch.arange(width, device=index.device).expand(rows, width)  # (R, P * L)
        row_of = torch.arange(rows, device=index.device)[:, None].expand(rows, width)  # (R, P * L)
        source = torch.full((rows * self.seq_len,), -1, dtype=torch.int64, device=index.device)
        source[(row_of * self.seq_len + index)[real]] = places[real]
        source = source.view(rows, self.seq_len)  # (R, T)
        if bool((source < 0).any()):
            raise ValueError("SequenceSplit.index does not hold every token of its rows once")
        for name, value in (("size", size), ("rank", rank), ("index", index), ("_source", source)):
            object.__setattr__(self, name, value)

    # -- what a block calls ----------------------------------------------------------------------------------
    def check_heads(self, what: str, heads: int) -> None:
        """One-line ``UserError`` unless ``heads`` (this rank's, after tensor parallelism) split over the group."""
        if heads % self.size:
            fits = ", ".join(str(n) for n in range(1, heads + 1) if heads % n == 0)
            raise UserError(
                f"{what}: {heads} heads (per tp rank) do not split over parallel.sizes.cp = {self.size} ranks for the "
                f"recurrent layers' all-to-all; allowed: a cp dividing {heads} ({fits})"
            )

    def my_channels(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's share along ``dim`` (``C -> c``: the ``rank``-th of ``size`` equal runs), e.g. the rows of
        a per-channel parameter that go with the channels ``to_full_sequence`` gave this rank."""
        dim = dim % tensor.dim()
        return tensor.unflatten(dim, (self.size, -1)).select(dim, self.rank)

    def to_full_sequence(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each ``(R, L, C_i)`` (this rank's tokens, every channel) -> ``(R, T, C_i / P)``: every token of the full
        rows in their order, this rank's share of the channels (``my_channels``); one all-to-all for all."""
        widths = self._widths(tensors)
        rows, local = tensors[0].shape[:2]
        send = torch.cat([t.unflatten(-1, (self.size, -1)) for t in tensors], dim=-1)  # (R, L, P, sum c)
        recv = _AllToAll.apply(send.movedim(2, 0), self.group)  # (P, R, L, sum c): part j is rank j's tokens
        tokens = recv.movedim(0, 1).reshape(rows, self.size * local, -1)  # (R, P * L, sum c) group order
        full = tokens.gather(1, self._source[..., None].expand(-1, -1, tokens.shape[-1]))  # (R, T, sum c)
        return tuple(full.split(widths, dim=-1))

    def to_local_tokens(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The inverse: each ``(R, T, c_i)`` (full rows, this rank's channels) -> ``(R, L, P * c_i)`` (this rank's
        tokens, every rank's channels in rank order; zeros at padding)."""
        widths = [t.shape[-1] for t in tensors]
        full = torch.cat(tensors, dim=-1)  # (R, T, sum c)
        taken = full.gather(1, self.index.clamp(min=0)[..., None].expand(-1, -1, full.shape[-1]))  # (R, P * L, sum c)
        taken = taken * (self.index >= 0)[..., None].to(taken.dtype)  # padding: zeros
        send = taken.unflatten(1, (self.size, -1)).movedim(1, 0)  # (P, R, L, sum c): part j is rank j's tokens
        recv = _AllToAll.apply(send, self.group)  # (P, R, L, sum c): part j is rank j's channels of my tokens
        mine = recv.movedim(0, 2)  # (R, L, P, sum c)
        return tuple(part.flatten(-2) for part in mine.split(widths, dim=-1))

    def full_context(self, ctx: BlockContext) -> BlockContext:
        """``ctx`` for the full rows: their positions and documents, no split (a block called with it runs on
        the full sequence), no per-token ids (they are this rank's)."""
        return replace(
            ctx,
            positions=self.positions,
            cu_seqlens=self.cu_seqlens,
            max_seqlen=self.max_seqlen,
            token_ids=None,
            sequence_split=None,
        )

    def _widths(self, tensors: tuple[torch.Tensor, ...]) -> list[int]:
        if not tensors:
            raise ValueError("SequenceSplit.to_full_sequence: no tensors given")
        rows, local = tensors[0].shape[:2]
        if rows != self.index.shape[0] or local * self.size != self.index.shape[1]:
            raise ValueError(
                f"SequenceSplit: tokens {tuple(tensors[0].shape[:2])} do not match the split's "
                f"({self.index.shape[0]}, {self.index.shape[1] // self.size}) per rank"
            )
        widths = []
        for t in tensors:
            if t.dim() != 3 or t.shape[:2] != tensors[0].shape[:2] or t.shape[-1] % self.size:
                raise ValueError(
                    f"SequenceSplit.to_full_sequence: tensor {tuple(t.shape)}: need (R, L, C) with C divisible by "
                    f"{self.size} ranks, all with the same (R, L)"
                )
            widths.append(t.shape[-1] // self.size)
        return widths
