"""Expert blocks under ``tp``: each rank of the group routes its own share of the tokens.

Shape legend: B rows, T tokens per row, Tl = T / tp this rank's tokens, H hidden.

Why a module of its own: an expert block (a module declaring parameters of role ``expert``,
``TPPlan.expert_blocks``: the ``moe`` block) sends every token its own way, so the ranks of the tensor-parallel
group need not repeat its work on the same tokens. Rank ``r`` runs it on tokens ``[r * Tl, (r + 1) * Tl)``
of every row, Megatron's way with expert TP = 1:

* without sequence parallelism the block's input (whole, the same on every rank) is split on entry (backward:
  the tokens' gradients all-gathered) and its output all-gathered on exit (backward: this rank's tokens of a
  gradient every rank holds whole);
* with sequence parallelism the layer's residual stream is split by tokens already: the block is no region
  (its input is not gathered), it runs on the rank's tokens as a norm does;
* either way, each child of the block holding row-parallel linears (the shared experts) is a region of its
  own: its input gathered by tokens, its row-parallel outputs reduce-scattered by tokens (as sequence
  parallelism does for attention), so it computes all the tokens with its slice of the columns;
* the context the block gets is narrowed to its tokens (``token_ids``, ``positions``; no document
  boundaries: an expert block reads none);
* gradients: what ``tp`` keeps whole in the block outside those regions (the router) sees a rank's tokens,
  so its gradient is summed over the group (``ExpertTokens.summed``); expert weights too, unless a layout
  sharded them over a mesh holding the tp ranks (``ep`` folded over ``tp``: each rank's experts are its own),
  decided at each sync from the gradient's DTensor mesh (``expert_grads_to_sum``).

With ``[parallel.tp] expert_tp`` (expert TP = attention TP, ``TPPlan.expert_splits``) the block computes every
token instead, as attention does: under sequence parallelism it is a gathered region; its experts' stacked
weights are split along the FFN (``gate``/``up`` dim 1, ``down`` dim 2), the rows entering the experts get
their gradient summed over the group and the experts' outputs are summed in forward (column/row parallel over
the grouped GEMMs); its row-parallel linears (shared experts) all-reduce too, and under sequence parallelism
the block's output keeps the rank's tokens (backward: all-gathered): two all-reduces where one reduction of
their sum would do (a later optimisation).

What depends on all of a micro-batch's tokens (the load behind the router's expert bias, auxiliary losses,
capacity) is the expert-parallel layout's and the block's business: ``ep`` hands the block the tp group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.errors import UserError
from mcore.protocols.block import BlockContext
from mcore.tp_regions import sum_grad_over
from mcore_parallel.sequence_parallel import SequencePlan, gather_tokens, split_tokens
from mcore_parallel.tp_plan import TPPlan

__all__ = [
    "ExpertTokens",
    "expert_grads_to_sum",
    "install_expert_tokens",
    "plan_expert_tokens",
    "sequence_plan",
]

TOKEN_DIM = 1  # hidden states (B, T, H), context tensors (B, T)


@dataclass(kw_only=True)
class ExpertTokens:
    """Paths (as ``model.named_modules()`` spells them) of what the token split of expert blocks touches."""

    blocks: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    """Children of the blocks holding row-parallel linears: input gathered by tokens."""
    row_outputs: set[str] = field(default_factory=set)
    """Row-parallel linears inside the blocks: outputs reduce-scattered by tokens."""
    summed: list[str] = field(default_factory=list)
    """Parameter names kept whole by ``tp`` in the blocks outside ``regions`` (not experts): summed over tp."""
    split: list[str] = field(default_factory=list)
    """With expert TP: the modules holding split expert weights (their input and output summed over tp)."""


def _inside(path: str, parents: list[str] | set[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in parents)


def plan_expert_tokens(model: nn.Module, plan: TPPlan) -> ExpertTokens:
    """The regions, row outputs and summed parameters of ``plan.expert_blocks`` (``ValueError`` naming the
    first problem; nothing touched)."""
    out = ExpertTokens(blocks=list(plan.expert_blocks))
    if plan.expert_splits:  # expert TP: the blocks compute every token, their experts split like the linears
        out.split = sorted({name.rpartition(".")[0] for name in plan.expert_splits})
        if any(path in out.blocks for path in out.split):
            raise ValueError(
                f"tp: expert_tp needs the expert weights of {out.split[0]!r} in a module of their own (the block's "
                "experts, whose input and output tp sums); allowed: parallel.tp.expert_tp = false for this model"
            )
        return out
    split = [*plan.colwise, *plan.head_slices, *plan.vocab_embeddings]
    for block_path in out.blocks:
        block = model.get_submodule(block_path)
        prefix = f"{block_path}." if block_path else ""
        for child_name, child in block.named_children():
            path = f"{prefix}{child_name}"
            rows = [r for r in plan.rowwise if _inside(r, {path})]
            if not rows:
                continue
            if isinstance(child, nn.Linear):
                raise ValueError(
                    f"tp: expert block {block_path!r} has row-parallel linear {path!r} as a direct child; allowed: "
                    "its split linears inside a child module (the shared experts' gate/up/down)"
                )
            out.regions.append(path)
            out.row_outputs.update(rows)
        stray = [s for s in split if _inside(s, {block_path}) and not _inside(s, out.regions)]
        if stray:
            raise ValueError(
                f"tp: {stray[0]!r} in expert block {block_path!r} splits its outputs over the ranks outside a module "
                "ending in a row-parallel linear; allowed: split linears inside a child that sums them (shared experts)"
            )
        out.summed.extend(n for n in plan.whole if _inside(n, {block_path}) and not _inside(n, out.regions))
    return out


def sequence_plan(sp: SequencePlan, experts: ExpertTokens) -> SequencePlan:
    """``sp`` (planned with the expert blocks as ``token_wise``) completed for them: each block runs on the rank's
    tokens, its regions (shared experts) gathered; with expert TP each block is a gathered region instead, its
    row-parallel outputs all-reduced (summed with the experts')."""
    missing = [b for b in experts.blocks if b.rpartition(".")[0] not in sp.layers]
    if missing:
        raise ValueError(
            f"tp: expert block {missing[0]!r} is not a direct child of one of the model's layers; allowed under "
            "sequence_parallel: expert blocks in a layer's MLP position"
        )
    if experts.split:
        return dataclasses.replace(sp, regions=[*sp.regions, *experts.blocks])
    return dataclasses.replace(
        sp, regions=[*sp.regions, *experts.regions], row_outputs=sp.row_outputs | experts.row_outputs
    )


class _SumOutput(torch.autograd.Function):
    """Forward: the sum over the group of each rank's partial output; backward: the gradient as it is."""

    @staticmethod
    def forward(ctx, partial, group):  # type: ignore[override]
        total = partial.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def _install_split(model: nn.Module, experts: ExpertTokens, group: Any, rank: int, world: int, sp: bool) -> None:
    """Expert TP: the experts' input rows get their gradient summed over the group, their outputs summed in
    forward; under sequence parallelism each block's output keeps this rank's tokens (backward: all-gather)."""

    def enter(module: nn.Module, args: tuple[Any, ...]) -> Any:
        return (sum_grad_over(args[0], group), *args[1:])

    def leave(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return _SumOutput.apply(output, group)  # type: ignore[no-any-return]

    def mine(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return split_tokens(output, group, rank, world)

    for path in experts.split:
        module = model.get_submodule(path)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    if sp:
        for path in experts.blocks:
            model.get_submodule(path).register_forward_hook(mine)


def _narrow(ctx: BlockContext, rank: int, world: int) -> BlockContext:
    """``ctx`` for this rank's tokens: ``token_ids`` and ``positions`` ``(B, Tl)``; no document boundaries."""

    def mine(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.chunk(world, dim=TOKEN_DIM)[rank]

    return dataclasses.replace(
        ctx, token_ids=mine(ctx.token_ids), positions=mine(ctx.positions), cu_seqlens=None, max_seqlen=None
    )


def install_expert_tokens(
    model: nn.Module, experts: ExpertTokens, group: Any, rank: int, world: int, *, sequence_parallel: bool
) -> None:
    """Register each expert block's hooks: the context narrowed to the rank's tokens and, without sequence
    parallelism, the input split and the output gathered; its regions' input gather (without sequence
    parallelism: under it ``apply_sequence_parallel`` registers those, ``sequence_plan``). With expert TP the
    experts' sums instead (``_install_split``)."""
    if experts.split:
        _install_split(model, experts, group, rank, world, sequence_parallel)
        return

    def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args, kwargs = tuple(args), dict(kwargs)
        hidden = args[0] if args else kwargs.get("hidden")
        if not sequence_parallel and isinstance(hidden, torch.Tensor) and hidden.shape[TOKEN_DIM] % world:
            raise UserError(
                f"tp: expert blocks route each tp rank's share of a row's {hidden.shape[TOKEN_DIM]} tokens, which "
                f"do not split over tp = {world}; allowed: train.seq_len a multiple of {world}, or "
                "parallel.tp.expert_tp = true"
            )
        if not sequence_parallel:
            if args:
                args = (split_tokens(args[0], group, rank, world), *args[1:])
            else:
                kwargs["hidden"] = split_tokens(kwargs["hidden"], group, rank, world)
        if len(args) > 1 and isinstance(args[1], BlockContext):
            args = (args[0], _narrow(args[1], rank, world), *args[2:])
        elif isinstance(kwargs.get("ctx"), BlockContext):
            kwargs["ctx"] = _narrow(kwargs["ctx"], rank, world)
        return args, kwargs

    def leave(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return gather_tokens(output, group, rank, world)

    def gather(module: nn.Module, args: tuple[Any, ...]) -> Any:
        return (gather_tokens(args[0], group, rank, world), *args[1:])

    for path in experts.blocks:
        block = model.get_submodule(path)
        block.register_forward_pre_hook(enter, with_kwargs=True)
        if not sequence_parallel:
            block.register_forward_hook(leave)
    if not sequence_parallel:
        for path in experts.regions:
            model.get_submodule(path).register_forward_pre_hook(gather)


def expert_grads_to_sum(params: list[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """The local gradients of ``params`` (expert weights) that hold only this rank's tokens: all of them
    except those whose DTensor mesh spans every rank of ``group`` (each rank's experts its own)."""
    peers = frozenset(dist.get_process_group_ranks(group))
    out = []
    for p in params:
        if p.grad is None:  # unused on this rank: it still takes part in the sum
            p.grad = torch.zeros_like(p)
        grad = p.grad
        if isinstance(grad, DTensor):
            if peers <= set(grad.device_mesh.mesh.flatten().tolist()):
                continue
            grad = grad.to_local()
        out.append(grad)
    return out
