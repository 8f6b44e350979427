"""Layout ``cp``: context parallelism over the ``cp`` mesh dimension, each rank computing part of every sequence.

Every rank of ``cp`` reads the same micro-batch (``data_parallel()`` is ``1``); ``shard_batch`` keeps
this rank's zig-zag part of every row (``cp_split``: chunks ``r`` and ``2 * cp - 1 - r`` of each
sequence, packed documents each split on their own and padded) with positions kept global, and
puts in the context the attention backend that sees the other ranks' keys (``cp_attention``:
``[parallel.cp] kind = "ring"``, ``"allgather"``, ``"a2a"`` or ``"a2a+ring"``: all-to-all inside groups
of ``a2a_size`` consecutive cp ranks, a ring across them; ``apply`` creates those groups). The model is
not touched: it stays whole on every rank (``apply`` returns it as it is, on the meta device too).
Multi-token prediction reads the row a few tokens ahead, which a split row does not hold: for a
model with ``config.mtp_num_layers`` depths the context's ``extra[MTP_AHEAD]`` (``mcore.protocols.block``)
carries, per depth, this rank's part of the row's tokens and labels that far ahead, computed before
the split.

The loss is split: ``loss_group()`` is the ``cp`` group, so the model divides each rank's loss sum
by the label count over the group and the ranks' losses (and their gradients) add up to the
micro-batch's. ``finish_grad_sync`` therefore SUMS the gradients over the group (deferred under
``no_grad_sync``: the sum is linear, so one sum per step is enough); they are then equal on every
rank, plain tensors counted once by the global norm.

Composes with ``tp`` (``["tp", "cp"]``: the heads a rank holds, their K/V passed over ``cp``; tensor-
parallel gradients are DTensors whose local shards are summed) and with ``fsdp`` (``["cp", "fsdp"]``).
By default fsdp shards over ``dp_shard`` and reduces over it, and this layout then sums each local
shard over ``cp``. With ``[parallel.fsdp] borrow = ["cp"]`` (torchtitan's layout) fsdp shards every
parameter over ``dp_shard x cp``: its reduce-scatter already sums the ``cp`` ranks' gradients and
divides by ``dp_shard`` only, so ``finish_grad_sync`` skips every gradient whose DTensor mesh holds all
the ``cp`` ranks (no double sum).

Dynamic CP (``[parallel.cp] dynamic = true``, Megatron's hybrid data x context parallelism): each
micro-batch's documents are planned by ``cp_split.plan_dynamic``, each over as few ranks as its length
needs, short ones whole on one rank; a rank's row then holds its parts of split documents first and its
whole documents after them, every row of the micro-batch in one (``(1, L)``). Every rank still runs one
forward per micro-batch, so fsdp's per-layer collectives line up. ``allgather`` exchanges only the split
documents' keys; ``ring`` and ``a2a`` pass whole rows (masked: correct, without the saving).

Recurrent layers (blocks with ``carries_sequence_state`` and ``supports_sequence_split``: GDN, Mamba2) run by a
head-parallel all-to-all (Ulysses): for a model that has them ``shard_batch`` also puts a
``mcore.sequence_split.SequenceSplit`` in the context (every rank's token indices in group order, and the full
rows' positions and documents), with which each such block gives every rank the whole sequence for
``heads / cp`` of its heads around its conv and recurrence. It runs over the whole ``cp`` group whatever the
attention ``kind`` (``a2a+ring``'s groups are attention's only); under dynamic CP the full "row" is the flattened
micro-batch, its documents cut at the row ends. A recurrent block that does not declare
``supports_sequence_split`` is refused in ``apply`` in one line.

Not yet: a fused partial-attention kernel on GPU for document masks.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.errors import UserError
from mcore.protocols.block import MTP_AHEAD, BlockContext, sequence_state_blocks
from mcore.protocols.layout import DataParallelInfo
from mcore.sequence_split import SequenceSplit
from mcore_parallel.cp_attention import AllGatherAttention, AllToAllAttention, HybridAttention, RingAttention
from mcore_parallel.cp_split import (
    SplitPlan,
    check_seq_len,
    document_positions,
    labels_ahead,
    plan_dynamic,
    plan_split,
)
from mcore_parallel.group_grads import DeferredSync, local_grad, sum_over_group

if TYPE_CHECKING:
    from mcore.mesh import ParallelMesh
    from mcore.protocols.precision import PrecisionRecipe

DIM = "cp"
KINDS: dict[str, type[RingAttention] | type[AllGatherAttention] | type[AllToAllAttention] | type[HybridAttention]] = {
    "ring": RingAttention,
    "allgather": AllGatherAttention,
    "a2a": AllToAllAttention,
    "a2a+ring": HybridAttention,
}
HYBRID = "a2a+ring"


def check_a2a_size(a2a_size: int, cp: int) -> None:
    """``kind = 'a2a+ring'``: the all-to-all groups must tile ``cp`` with more than one group of more than one rank."""
    if not (1 < a2a_size < cp and cp % a2a_size == 0):
        fits = ", ".join(str(n) for n in range(2, cp) if cp % n == 0) or "none: use kind 'a2a' or 'ring'"
        raise UserError(
            f"parallel.cp.a2a_size = {a2a_size} with parallel.cp.kind = 'a2a+ring' and parallel.sizes.cp = {cp}; "
            f"allowed: a divisor of {cp} above 1 and below it ({fits})"
        )


def _hybrid_groups(mesh: ParallelMesh, a2a_size: int) -> tuple[Any, Any]:
    """This rank's all-to-all group (``a2a_size`` consecutive cp ranks) and ring group (the cp ranks with the
    same place in their all-to-all group). Every rank creates every group, in the same order."""
    assert mesh.device_mesh is not None
    cp = mesh.size(DIM)
    ranks = mesh.device_mesh.mesh.movedim(mesh.dim_names.index(DIM), -1).reshape(-1, cp)  # (cp groups, cp)
    me = dist.get_rank()
    mine: list[Any] = [None, None]
    for row in ranks:
        tiles = row.view(cp // a2a_size, a2a_size)  # (ring size, a2a_size): row g is all-to-all group g
        for which, members in ((0, tiles), (1, tiles.t())):
            for group_ranks in members.tolist():
                group = dist.new_group(group_ranks)
                if me in group_ranks:
                    mine[which] = group
    return mine[0], mine[1]


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
        heads, per tp rank, must divide by ``cp``) or ``a2a+ring`` (all-to-all inside groups of ``a2a_size``
        consecutive cp ranks, a ring across the groups)."""
        a2a_size: int | None = None
        """``kind = "a2a+ring"``: ranks per all-to-all group (a node), dividing ``cp``, above 1 and below ``cp``;
        the query heads, per tp rank, must divide by it."""
        dynamic: bool = False
        """Dynamic CP (hybrid data x context parallelism): each document of a micro-batch over as few cp ranks
        as its length needs (short ones whole on one rank, long ones zig-zag over 2, 4, ... ranks), balancing
        tokens per rank; with ``kind = "allgather"`` only the split documents' keys are exchanged."""
        dynamic_balance: str = "tokens"
        """What dynamic CP balances: ``tokens``, or ``work`` (tokens plus causal pairs weighed against the rest of
        a layer: a token's attention at position ``6 * hidden_size`` costs as much as its projections and MLP)."""

        def __post_init__(self) -> None:
            if self.kind not in KINDS:
                raise ValueError(f"parallel.cp.kind = {self.kind!r}; allowed: {', '.join(map(repr, KINDS))}")
            if self.kind == HYBRID and (not isinstance(self.a2a_size, int) or self.a2a_size < 2):
                raise ValueError(
                    f"parallel.cp.a2a_size = {self.a2a_size!r} with parallel.cp.kind = 'a2a+ring'; allowed: the ranks "
                    "per all-to-all group, an int above 1 dividing parallel.sizes.cp and below it"
                )
            if self.dynamic_balance not in ("tokens", "work"):
                raise ValueError(f"parallel.cp.dynamic_balance = {self.dynamic_balance!r}; allowed: 'tokens', 'work'")
            if self.kind != HYBRID and self.a2a_size is not None:
                warnings.warn(
                    f"parallel.cp.a2a_size = {self.a2a_size} is not used by parallel.cp.kind = {self.kind!r} "
                    "(only by 'a2a+ring')",
                    stacklevel=2,
                )

    @staticmethod
    def check_run(config: Config, run: Any) -> None:
        """Rows of one document (``data.packing = 'concat'``): ``train.seq_len`` must split into ``2 * cp`` chunks."""
        cp = run.parallel.sizes.get(DIM)
        if isinstance(cp, int) and cp > 1 and run.data.packing == "concat" and not config.dynamic:
            check_seq_len(run.train.seq_len, cp)
        if isinstance(cp, int) and config.kind == HYBRID and config.a2a_size is not None:
            check_a2a_size(config.a2a_size, cp)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or type(self).Config()
        self._mesh: ParallelMesh | None = None
        self._model: nn.Module | None = None
        self._hybrid: tuple[Any, Any] | None = None  # kind a2a+ring: this rank's all-to-all and ring groups
        self._mtp_depths = 0  # the model's multi-token prediction depths (``model.config.mtp_num_layers``)
        self._attention_tokens: int | None = None  # dynamic_balance = 'work': 6 * the model's hidden size
        self._recurrent = False  # the model has recurrent blocks: they get the cp all-to-all (``SequenceSplit``)

    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module:
        recurrent = sequence_state_blocks(model) if mesh.size(DIM) > 1 else []
        unsupported = [
            p for p in recurrent if not getattr(type(model.get_submodule(p)), "supports_sequence_split", False)
        ]
        if unsupported:
            raise UserError(
                f"cp: {unsupported[0]!r} ({type(model.get_submodule(unsupported[0])).__name__}) runs a state along the "
                "whole sequence, which context parallelism would split over ranks, and does not declare "
                "supports_sequence_split (the all-to-all to its whole sequence); allowed: parallel.sizes.cp = 1 for "
                "this model (tp, fsdp and pp work), or a block that reads BlockContext.sequence_split"
            )
        self._recurrent = bool(recurrent)
        mtp = getattr(getattr(model, "config", None), "mtp_num_layers", 0)
        self._mtp_depths = mtp if isinstance(mtp, int) else 0
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if self.config.dynamic and self.config.dynamic_balance == "work":
            if not isinstance(hidden, int):
                raise UserError(
                    "parallel.cp.dynamic_balance = 'work' needs the model's config.hidden_size to weigh attention "
                    f"against the rest of a layer; {type(model).__name__} has none; allowed: dynamic_balance = 'tokens'"
                )
            self._attention_tokens = 6 * hidden
        if self.config.kind == HYBRID and mesh.size(DIM) > 1 and self.config.a2a_size is not None:
            check_a2a_size(self.config.a2a_size, mesh.size(DIM))
            self._hybrid = _hybrid_groups(mesh, self.config.a2a_size)
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
        if self.config.dynamic:
            plan = plan_dynamic(
                ctx.cu_seqlens, batch, seq, size, tokens.device, attention_tokens=self._attention_tokens
            )
        else:
            plan = plan_split(ctx.cu_seqlens, batch, seq, size, tokens.device)
        positions = ctx.positions
        if positions is None:
            positions = document_positions(ctx.cu_seqlens, batch, seq, tokens.device)  # (B, T)
        positions = positions.expand(batch, seq)
        local = plan.take(rank, tokens, 0)  # (B, L)
        extra = dict(ctx.extra)
        if self._mtp_depths:  # what MTP depth d reads d tokens ahead, from the whole row (``MTP_AHEAD``)
            extra[MTP_AHEAD] = tuple(
                (plan.take(rank, tokens.roll(-d, dims=1), 0), plan.take(rank, labels_ahead(labels, positions, d), -100))
                for d in range(1, self._mtp_depths + 1)
            )
        view = dataclasses.replace(
            ctx,
            extra=extra,
            positions=plan.take(rank, positions, 0),
            cu_seqlens=None,  # the backend knows the documents; a local cu_seqlens would mislead
            max_seqlen=None,
            token_ids=local,
            attention=self._attention(group, plan),
            loss_group=group,
            sequence_split=self._sequence_split(group, plan, ctx, positions) if self._recurrent else None,
        )
        return local, plan.take(rank, labels, -100), view

    def _attention(self, group: Any, plan: SplitPlan) -> Any:
        """The backend of ``kind`` for this micro-batch's split (one per ``shard_batch``: it caches the masks)."""
        if self._hybrid is not None:
            return HybridAttention(group, plan, *self._hybrid)
        return KINDS[self.config.kind](group, plan)  # type: ignore[call-arg]

    @staticmethod
    def _sequence_split(group: Any, plan: SplitPlan, ctx: BlockContext, positions: torch.Tensor) -> SequenceSplit:
        """The all-to-all the recurrent blocks run over the whole ``cp`` group (whatever the attention ``kind``):
        every rank's tokens in group order, and the full rows' documents. A dynamic plan indexes the micro-batch
        flattened to one row, so the full "row" is that one: its documents are ``cu_seqlens`` cut at the row
        ends (no state crosses a row end, as in one process)."""
        batch, seq = positions.shape
        index = torch.cat(plan.index, dim=1)  # (B, cp * L), or (1, cp * L) flat
        if not plan.flat:
            return SequenceSplit(
                group=group,
                index=index,
                seq_len=seq,
                positions=positions,
                cu_seqlens=ctx.cu_seqlens,
                max_seqlen=ctx.max_seqlen,
            )
        ends = set(range(0, batch * seq + 1, seq))
        bounds = sorted(ends | (set(ctx.cu_seqlens.tolist()) if ctx.cu_seqlens is not None else set()))
        cu = torch.tensor(bounds, dtype=torch.int32, device=positions.device)  # (D + 1,) over the flat row
        return SequenceSplit(
            group=group,
            index=index,
            seq_len=batch * seq,
            positions=positions.reshape(1, -1),
            cu_seqlens=cu,
            max_seqlen=max(b - a for a, b in itertools.pairwise(bounds)),
        )

    def loss_group(self) -> Any:
        """The ``cp`` group: its ranks hold the parts of one micro-batch (``None`` at size 1)."""
        return self._require_mesh().group(DIM)

    # -- per step --------------------------------------------------------------------------------------------
    def data_parallel(self) -> DataParallelInfo:
        """Every rank of ``cp`` reads the same batch."""
        return DataParallelInfo(rank=0, size=1)

    def finish_grad_sync(self) -> None:
        """Sum the gradients over ``cp``: each rank's are its tokens' share of the micro-batch's; those
        a layout already reduced over the ``cp`` ranks (fsdp borrowing ``cp``) are left as they are."""
        group = self._require_mesh().group(DIM)
        if not self.syncing or group is None or self._model is None:
            return
        peers = frozenset(dist.get_process_group_ranks(group))
        covered: dict[int, bool] = {}  # by mesh: whether it holds every cp peer (its layout reduced over them)
        grads = []
        for p in self._model.parameters():
            if not p.requires_grad:
                continue
            grad = local_grad(p)  # a DTensor's local shard (tp, fsdp): the same placement on every cp rank
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            if mesh is not None and id(mesh) not in covered:
                covered[id(mesh)] = peers <= set(mesh.mesh.flatten().tolist())
            if mesh is None or not covered[id(mesh)]:
                grads.append(grad)
        if grads:
            sum_over_group(grads, group)

    def state_dict_options(self) -> dict[str, Any]:
        """Nothing is split: plain tensors, the same on every rank."""
        return {}

    def _require_mesh(self) -> ParallelMesh:
        if self._mesh is None:
            raise RuntimeError(f"layout {self.name!r}: apply() has not been called")
        return self._mesh
