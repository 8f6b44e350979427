"""Sequence parallelism for the ``tp`` layout (``[parallel.tp] sequence_parallel = true``).

Shape legend: B rows, T tokens per row, Tl = T / tp this rank's tokens, H hidden.

Without it every rank of the tensor-parallel group holds the whole residual stream ``(B, T, H)``
between blocks, and the norms and residual adds run tp times on the same values. With it the
residual stream between the model's layers' blocks is split by tokens: rank ``r`` holds tokens
``[r * Tl, (r + 1) * Tl)`` of every row, and

* the norms and residual adds of each layer (its position-wise parts) run on ``(B, Tl, H)``;
* each block that splits its work over heads (a *region*: a direct child of a layer holding a
  row-parallel linear) all-gathers its input by tokens first, and its row-parallel outputs are
  reduce-scattered by tokens (torch's ``RowwiseParallel(output_layouts=Shard(1))``) instead of
  all-reduced: the same bytes on the wire as plain ``tp``, a ``tp``-th of the activations;
* with ``overlap_chunks`` a region's input is gathered by the layout's own chunked gather
  (``tp_overlap_gather.py``), the GEMMs reading it started as its chunks arrive;
* the first layer's input is split (each rank keeps its tokens of the embedding's output) and
  the last layer's output gathered, so the embedding and the loss head (vocab-parallel loss, MTP
  depths) see whole rows as without sequence parallelism.

Gradients stay exact: inside a region every block input gradient is whole and the same on every
rank (each column-parallel linear sums its input gradient over the group, as under plain ``tp``),
so the gather's backward keeps this rank's tokens; the split's backward all-gathers them; the
norms' scales see only their rank's tokens, so their gradients are summed over the group in
``finish_grad_sync`` (``SequencePlan.summed``).

The layers are the model's repeated blocks as the core finds them for recompute and compile
(``mcore.train.recompute.find_blocks``: the ``ModuleList`` named ``layers``); a layer's direct
children must each be a region or position-wise (a norm: parameters of role ``norm``, or no
parameters). Anything else (a token-mixing block that splits nothing over heads) is refused by
name, since it would see only a rank's tokens. A region's row-parallel linears must be its last
step (what they output is the block's output, added to the residual stream).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from mcore.errors import UserError
from mcore.params import collect_param_specs
from mcore.train.recompute import BLOCK_LISTS, find_blocks
from mcore_parallel.token_comm import all_gather_tokens
from mcore_parallel.tp_plan import TPPlan

__all__ = [
    "RegionGather",
    "SequencePlan",
    "apply_sequence_parallel",
    "gather_tokens",
    "plan_sequence_parallel",
    "split_tokens",
]

TOKEN_DIM = 1  # hidden states are (B, T, H)


@dataclass(kw_only=True)
class SequencePlan:
    """Paths (as ``model.named_modules()`` spells them) of what sequence parallelism touches."""

    layers: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    """Direct children of the layers that all-gather their input by tokens."""
    row_outputs: set[str] = field(default_factory=set)
    """Row-parallel linears (of ``TPPlan.rowwise``) whose outputs are reduce-scattered by tokens."""
    summed: list[str] = field(default_factory=list)
    """Parameter names of the position-wise parts (norm scales): each rank's gradient from its tokens."""


def plan_sequence_parallel(model: nn.Module, plan: TPPlan, *, token_wise: Collection[str] = ()) -> SequencePlan:
    """Regions, row outputs and summed parameters of ``model`` (``ValueError`` naming the first problem).

    ``token_wise``: paths of layer children that run on the rank's tokens under their caller's own plan (expert
    blocks, ``tp_experts``): neither gathered nor summed here."""
    layers = find_blocks(model)
    if not layers:
        raise ValueError(
            f"tp: sequence_parallel needs the model's layers in a ModuleList named {' / '.join(BLOCK_LISTS)}; "
            "allowed: parallel.tp.sequence_parallel = false for this model"
        )
    paths = {id(m): p for p, m in model.named_modules()}
    specs = collect_param_specs(model)
    split = set(plan.colwise) | set(plan.head_slices) | set(plan.vocab_embeddings)
    out = SequencePlan(layers=[paths[id(layer)] for layer in layers])
    for layer_path, layer in zip(out.layers, layers, strict=True):
        for child_name, child in layer.named_children():
            path = f"{layer_path}.{child_name}"
            if path in token_wise:
                continue
            inside = [r for r in plan.rowwise if r == path or r.startswith(path + ".")]
            if inside:
                out.regions.append(path)
                out.row_outputs.update(inside)
                continue
            if any(s == path or s.startswith(path + ".") for s in split):
                raise ValueError(
                    f"tp: {path!r} splits its outputs over the ranks but has no row-parallel linear to sum them; "
                    "allowed under sequence_parallel: blocks ending in a row-parallel linear, or norms"
                )
            names = [f"{path}.{n}" for n, p in child.named_parameters() if p.requires_grad]
            other = [n for n in names if specs[n].role != "norm"]
            if other:
                raise ValueError(
                    f"tp: {path!r} is neither a block split over heads (no row-parallel linear) nor a norm (parameter "
                    f"{other[0]!r} has role {specs[other[0]].role!r}), so it cannot run on a rank's tokens alone; "
                    "allowed: parallel.tp.sequence_parallel = false for this model"
                )
            out.summed.extend(names)
    return out


def _check_tokens(tokens: int, world: int) -> None:
    if tokens % world:
        raise UserError(
            f"tp: sequence_parallel splits each row's {tokens} tokens over tp = {world} ranks, which does not divide; "
            f"allowed: train.seq_len a multiple of {world}, or parallel.tp.sequence_parallel = false"
        )


def _my_tokens(whole: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's ``(B, Tl, *rest)`` of ``(B, T, *rest)``."""
    return whole.chunk(world, dim=TOKEN_DIM)[rank].contiguous()


class _SplitTokens(torch.autograd.Function):
    """Forward: keep this rank's tokens; backward: all-gather the tokens' gradients."""

    @staticmethod
    def forward(ctx, whole, group, rank, world):  # type: ignore[override]
        ctx.group, ctx.world = group, world
        return _my_tokens(whole, rank, world)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return all_gather_tokens(grad, ctx.group, ctx.world), None, None, None


class _GatherTokens(torch.autograd.Function):
    """Forward: all-gather the tokens; backward: this rank's tokens of a gradient every rank holds whole."""

    @staticmethod
    def forward(ctx, local, group, rank, world):  # type: ignore[override]
        ctx.rank, ctx.world = rank, world
        return all_gather_tokens(local, group, world)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _my_tokens(grad, ctx.rank, ctx.world), None, None, None


def split_tokens(whole: torch.Tensor, group: Any, rank: int, world: int) -> torch.Tensor:
    """``(B, T, H)`` -> this rank's ``(B, Tl, H)``; the backward all-gathers (``UserError`` if T does not split)."""
    _check_tokens(whole.shape[TOKEN_DIM], world)
    return _SplitTokens.apply(whole, group, rank, world)  # type: ignore[no-any-return]


def gather_tokens(local: torch.Tensor, group: Any, rank: int, world: int) -> torch.Tensor:
    """This rank's ``(B, Tl, H)`` -> ``(B, T, H)``; the backward keeps this rank's tokens of the gradient,
    which every rank of ``group`` must hold whole and alike (true after a column-parallel linear)."""
    return _GatherTokens.apply(local, group, rank, world)  # type: ignore[no-any-return]


def _replace_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], fn: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` with the hidden states (the first positional argument, or ``hidden``) mapped by ``fn``."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    if "hidden" in kwargs:
        return args, {**kwargs, "hidden": fn(kwargs["hidden"])}
    raise TypeError("tp sequence_parallel: a layer or block was called without its hidden states (B, T, H)")


class RegionGather(Protocol):
    """A region's own gather (``tp_overlap_gather.GatherRegion``): ``gather`` in its pre-hook, ``release``
    in its post-hook (what the call computed is dropped when the block returns)."""

    def gather(self, local: torch.Tensor) -> torch.Tensor: ...

    def release(self) -> None: ...


def apply_sequence_parallel(
    model: nn.Module,
    sp: SequencePlan,
    group: Any,
    rank: int,
    world: int,
    region_gathers: Mapping[str, RegionGather] | None = None,
) -> None:
    """Register the token split before the first layer, the gathers before each region and after the last layer.

    ``region_gathers``: regions (by path) whose input is gathered by their own ``gather`` instead of
    ``gather_tokens`` (the all-gather side of ``overlap_chunks``)."""

    def split(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _replace_hidden(args, kwargs, lambda h: split_tokens(h, group, rank, world))

    def gather(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _replace_hidden(args, kwargs, lambda h: gather_tokens(h, group, rank, world))

    def gather_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return gather_tokens(output, group, rank, world)

    model.get_submodule(sp.layers[0]).register_forward_pre_hook(split, with_kwargs=True)
    for path in sp.regions:
        region = model.get_submodule(path)
        own = (region_gathers or {}).get(path)
        if own is None:
            region.register_forward_pre_hook(gather, with_kwargs=True)
            continue
        region.register_forward_pre_hook(_own_gather(own), with_kwargs=True)
        region.register_forward_hook(_own_release(own), always_call=True)
    model.get_submodule(sp.layers[-1]).register_forward_hook(gather_output)


def _own_gather(own: RegionGather) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _replace_hidden(args, kwargs, own.gather)

    return hook


def _own_release(own: RegionGather) -> Any:
    @torch.compiler.disable
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        own.release()

    return hook
