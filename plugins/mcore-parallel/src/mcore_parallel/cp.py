"""Layout ``cp``: context parallelism over the ``cp`` mesh dimension, each rank computing part of every sequence.

Every rank of ``cp`` reads the same micro-batch (``data_parallel()`` is ``1``); ``shard_batch`` keeps
this rank's zig-zag part of every row (``cp_split``: chunks ``r`` and ``2 * cp - 1 - r`` of each
sequence, packed documents each split on their own and padded) with positions kept global, and
puts in the context the attention backend that sees the other ranks' keys (``cp_attention``:
``[parallel.cp] kind = "ring"``, ``"allgather"`` or ``"a2a"``). The model is not touched: it stays whole on
every rank (``apply`` returns it as it is, on the meta device too).

The loss is split: ``loss_group()`` is the ``cp`` group, so the model divides each rank's loss sum
by the label count over the group and the ranks' losses (and their gradients) add up to the
micro-batch's. ``finish_grad_sync`` therefore SUMS the gradients over the group (deferred under
``no_grad_sync``: the sum is linear, so one sum per step is enough); they are then equal on every
rank, plain tensors counted once by the global norm.

Composes with ``tp`` (``["tp", "cp"]``: the heads a rank holds, their K/V passed over ``cp``; tensor-
parallel gradients are DTensors whose local shards are summed) and with ``fsdp`` (``["cp", "fsdp"]``:
fsdp reduces over ``dp_shard``, this layout then sums each local shard over ``cp``; fsdp does not yet
shard over ``dp_shard x cp``).

Not yet: the hybrid kind ``a2a+ring``, dynamic CP, a fused partial-attention kernel
on GPU. Multi-token prediction reads tokens a few places ahead in the row, which a split row does
not hold: a model with MTP depths is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mcore.errors import UserError
from mcore.protocols.block import BlockContext
from mcore.protocols.layout import DataParallelInfo
from mcore_parallel.cp_attention import AllGatherAttention, AllToAllAttention, RingAttention
from mcore_parallel.cp_split import check_seq_len, document_positions, plan_split
from mcore_parallel.group_grads import DeferredSync, local_grad, sum_over_group

if TYPE_CHECKING:
    from mcore.mesh import ParallelMesh
    from mcore.protocols.precision import PrecisionRecipe

DIM = "cp"
KINDS: dict[str, type[RingAttention] | type[AllGatherAttention] | type[AllToAllAttention]] = {
    "ring": RingAttention,
    "allgather": AllGatherAttention,
    "a2a": AllToAllAttention,
}


class CPLayout(DeferredSync):
    """Context parallelism over ``cp``: zig-zag split, ring, all-gather or all-to-all attention (module docstring)."""

    name: ClassVar[str] = "cp"
    mesh_dims: ClassVar[tuple[str, ...]] = (DIM,)
    #: ``apply`` changes nothing in the model: it may be on the meta device
    supports_meta_init: ClassVar[bool] = True

    @dataclass(kw_only=True, slots=True)
    class Config:
        kind: str = "ring"
        """How a rank's queries see the other ranks' keys: ``ring`` (K/V blocks passed around with
        point-to-point transfers, merged by log-sum-exp), ``allgather`` (K/V all-gathered) or ``a2a``
        (DeepSpeed-Ulysses: an all-to-all gives each rank every token of ``heads / cp`` heads; the query
        heads, per tp rank, must divide by ``cp``)."""

        def __post_init__(self) -> None:
            if self.kind not in KINDS:
                raise ValueError(f"parallel.cp.kind = {self.kind!r}; allowed: {', '.join(map(repr, KINDS))}")

    @staticmethod
    def check_run(config: Config, run: Any) -> None:
        """Rows of one document (``data.packing = 'concat'``): ``train.seq_len`` must split into ``2 * cp`` chunks."""
        cp = run.parallel.sizes.get(DIM)
        if isinstance(cp, int) and cp > 1 and run.data.packing == "concat":
            check_seq_len(run.train.seq_len, cp)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or type(self).Config()
        self._mesh: ParallelMesh | None = None
        self._model: nn.Module | None = None

    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module:
        mtp = getattr(getattr(model, "config", None), "mtp_num_layers", 0)
        if mesh.size(DIM) > 1 and isinstance(mtp, int) and mtp > 0:
            raise UserError(
                f"layout 'cp': model.mtp_num_layers = {mtp} reads tokens ahead in the row, which a rank of "
                "parallel.sizes.cp does not hold; allowed: mtp_num_layers = 0 under cp"
            )
        self._mesh, self._model = mesh, model
        return model

    # -- the batch: this rank's tokens, the attention that sees the others ---------------------------------------
    def shard_batch(
        self, tokens: torch.Tensor, labels: torch.Tensor, ctx: BlockContext
    ) -> tuple[torch.Tensor, torch.Tensor, BlockContext]:
        """This rank's zig-zag part of every row, global positions, and the ``cp`` attention backend."""
        mesh = self._require_mesh()
        size, group = mesh.size(DIM), mesh.group(DIM)
        if size == 1 or group is None:
            return tokens, labels, ctx
        batch, seq = tokens.shape
        rank = mesh.rank(DIM)
        plan = plan_split(ctx.cu_seqlens, batch, seq, size, tokens.device)
        positions = ctx.positions
        if positions is None:
            positions = document_positions(ctx.cu_seqlens, batch, seq, tokens.device)  # (B, T)
        local = plan.take(rank, tokens, 0)  # (B, L)
        view = dataclasses.replace(
            ctx,
            positions=plan.take(rank, positions.expand(batch, seq), 0),
            cu_seqlens=None,  # the backend knows the documents; a local cu_seqlens would mislead
            max_seqlen=None,
            token_ids=local,
            attention=KINDS[self.config.kind](group, plan),
            loss_group=group,
        )
        return local, plan.take(rank, labels, -100), view

    def loss_group(self) -> Any:
        """The ``cp`` group: its ranks hold the parts of one micro-batch (``None`` at size 1)."""
        return self._require_mesh().group(DIM)

    # -- per step --------------------------------------------------------------------------------------------
    def data_parallel(self) -> DataParallelInfo:
        """Every rank of ``cp`` reads the same batch."""
        return DataParallelInfo(rank=0, size=1)

    def finish_grad_sync(self) -> None:
        """Sum the gradients over ``cp``: each rank's are its tokens' share of the micro-batch's."""
        group = self._require_mesh().group(DIM)
        if not self.syncing or group is None or self._model is None:
            return
        # a DTensor's local shard (tp, fsdp): the same placement on every cp rank
        sum_over_group([local_grad(p) for p in self._model.parameters() if p.requires_grad], group)

    def state_dict_options(self) -> dict[str, Any]:
        """Nothing is split: plain tensors, the same on every rank."""
        return {}

    def _require_mesh(self) -> ParallelMesh:
        if self._mesh is None:
            raise RuntimeError(f"layout {self.name!r}: apply() has not been called")
        return self._mesh
