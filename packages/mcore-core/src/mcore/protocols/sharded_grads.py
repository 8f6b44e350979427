"""Layout <-> optimizer handshake for ZeRO-1: reduce-scattered gradients in, updated shards out.

Why it exists: under replicated data parallelism (``ddp``) the layout owns gradient reduction and
the optimizer owns the update. ZeRO-1 (Megatron's ``DistributedDataParallel`` + ``DistributedOptimizer``)
needs both at once: the layout reduce-scatters gradients so that each data-parallel rank receives
only the range it owns, the optimizer updates that range (fp32 master, moments), and the layout
all-gathers the updated parameters. Plugins never import each other (``mcore-optim`` does not know
the layout plugin), so the two meet here, in the core.

The handshake, in the order it happens:

1. **Build** (``OptimizerFactory.build(model, mesh=, layouts=)``, once, after every layout was
   applied): the optimizer finds the layout with ``grad_sharding_layout(layouts)`` and calls its
   ``shard_grads()``. From then on the layout reduce-scatters instead of all-reducing. It returns
   ``GradShards``: which elements of which parameters this rank owns (``ShardPiece``), the
   data-parallel group they are split over, and the reduce dtype. ``None``: the layout cannot shard
   here (the optimizer then updates whole parameters, or refuses with a one-line error).
2. **Every step**: micro-batches under ``no_grad_sync()`` (nothing reduced), the last backward
   outside it, then ``finish_grad_sync()`` (the run loop's calls, unchanged). Afterwards each
   parameter's ``.grad`` holds the gradient averaged over the data-parallel ranks *on the elements
   this rank owns and zeros elsewhere*: like a ``Shard`` placement, every element is held by
   exactly one rank. The layout's ``grad_norm_replicas`` answers 1, so the global gradient norm
   (``mcore.train.grads.global_grad_norm``) counts each element once; clipping scales ``.grad``,
   the recipe's ``unscale_grads`` checks finiteness on ``.grad`` and the run loop agrees it over
   the ranks. Nothing else reads a gradient, so the run loop needs no special case.
3. **Update**: ``optimizer.step()`` reads its pieces' gradients (``piece.grad()``), updates its
   fp32 state, writes the new values of its pieces into the parameters (``piece.values()``, cast
   to the parameter's dtype) and, last, calls the layout's ``gather_params()``: every rank then
   holds every updated parameter (``MeshOptimizer.step``'s promise). The optimizer is the caller
   because only it knows whether it wrote anything: a step the run loop skips (non-finite
   gradients, a loss spike) never calls ``step()``, the parameters were not touched on any rank
   and nothing needs gathering. A layout may start the gather asynchronously and wait for each
   bucket in a forward pre-hook (Megatron's overlap with the next forward), provided nothing can
   read a parameter before it is complete (``state_dict``, evaluation, the next
   ``finish_grad_sync``).

Gradient accumulation changes nothing: ``no_grad_sync`` defers the reduce-scatter to the last
micro-batch, once per step. ``zero_grad(set_to_none=True)`` may drop ``.grad``; the layout makes
the gradients again in the next ``finish_grad_sync`` (a parameter no rank has a gradient for gets
zeros).

Ownership rules (what makes checkpoints reshard):

* elements are numbered in each parameter's flattened (row-major) order; rank ``r`` owns
  ``[piece.start, piece.stop)`` of each parameter, and the ranges of ranks ``0 .. size-1`` follow
  each other: concatenated in rank order they are the whole flattened parameter. A parameter may
  be split between ranks (a rank's range of a flat buffer ends inside it) but lies in one bucket
  of the layout, as in Megatron (a parameter across two buckets would break rank order).
* ``GradShards.pieces`` names every parameter the layout reduces, in the same order on every rank,
  with ``start == stop`` where this rank owns none, so collectives over the pieces line up.
* Optimizer state saved per parameter name as a 1-D tensor of the parameter's element count,
  sharded over ``GradShards.device_mesh`` as a row-ragged ``Shard(0)`` DTensor whose local part is
  this rank's piece (``mcore.ragged.annotate_for_checkpoint`` gives DCP its real chunks; the
  checkpoint code calls it), reshards under any data-parallel size, 1 included (plain tensors
  there). The state dict records each parameter's whole shape, as ``MeshOptimizer`` asks.
* ``mcore plan``: a factory that uses this handshake answers
  ``OptimizerStateSize.shards_state_over_dp(sharded_params=False)`` with ``True``.

Not covered yet: parameters that are ``DTensor``s when this layout is applied (``tp`` or
``fsdp`` before it): a layout declines (``None``) until pieces of local shards and their
checkpoint format are defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mcore.errors import UserError
from mcore.protocols.layout import ParallelLayout

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True, kw_only=True)
class ShardPiece:
    """The elements ``[start, stop)`` of one parameter's flattened values that this rank owns.

    ``name``: the parameter's name in ``model.named_parameters()`` of the model the layout
    returned (the optimizer keys its state by it); ``shape``/``dtype``: the whole parameter's;
    ``bucket``: the layout's bucket holding it (a unit of communication; informative);
    ``param``: the parameter itself.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    stop: int
    bucket: int = 0
    param: torch.nn.Parameter = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        total = 1
        for d in self.shape:
            total *= d
        assert 0 <= self.start <= self.stop <= total, f"{self.name}: [{self.start}, {self.stop}) outside {total}"

    @property
    def numel(self) -> int:
        """Elements this rank owns (0: none)."""
        return self.stop - self.start

    def grad(self) -> torch.Tensor:
        """This rank's range of the averaged gradient (valid after ``finish_grad_sync``), a 1-D view."""
        grad = self.param.grad
        assert grad is not None, f"{self.name} has no gradient: call finish_grad_sync() before the optimizer"
        return grad.detach().view(-1)[self.start : self.stop]

    def values(self) -> torch.Tensor:
        """This rank's range of the parameter's values, a 1-D view the optimizer writes its update into."""
        return self.param.detach().view(-1)[self.start : self.stop]


@dataclass(frozen=True, kw_only=True)
class GradShards:
    """What ``shard_grads()`` hands the optimizer: this rank's pieces and the group they split over.

    ``rank``/``size``/``group``: the data-parallel group (``group is None`` when ``size == 1``);
    ``device_mesh``: the 1-D mesh over it for the state's ``DTensor``s (``None`` when ``size == 1``);
    ``reduce_dtype``: the dtype gradients are summed in (the optimizer reads them in the
    parameter's dtype from ``.grad``).
    """

    pieces: tuple[ShardPiece, ...]
    rank: int
    size: int
    group: ProcessGroup | None = None
    device_mesh: DeviceMesh | None = None
    reduce_dtype: torch.dtype

    def owned(self) -> tuple[ShardPiece, ...]:
        """The pieces with at least one element on this rank."""
        return tuple(p for p in self.pieces if p.numel)

    @property
    def numel(self) -> int:
        """Elements this rank owns over all parameters."""
        return sum(p.numel for p in self.pieces)


@runtime_checkable
class GradientShardingLayout(ParallelLayout, Protocol):
    """A data-parallel layout that can hand the optimizer reduce-scattered gradients (ZeRO-1).

    Contract (see the module docstring for the whole handshake):
        * ``shard_grads()``: called by an optimizer factory's ``build``, at most once per run
          (a second call returns the same shards); switches ``finish_grad_sync`` from all-reduce
          to reduce-scatter and returns this rank's ``GradShards``, or ``None`` when the layout
          cannot shard (then it keeps all-reducing). Before it is called the layout is a plain
          all-reduce layout, so it works with any optimizer.
        * ``finish_grad_sync()`` once sharded: ``.grad`` of every parameter it reduces holds the
          gradient averaged over the group on this rank's pieces and zeros elsewhere.
        * ``grad_norm_replicas(name, param)``: 1 once sharded (each gradient element is on one
          rank of the group), ``None`` before.
        * ``gather_params()``: a collective over the group, called by the optimizer at the end of
          every ``step()`` that changed parameters, after writing its pieces' new values into the
          parameters; afterwards every rank's parameters equal the owners' values.
    """

    def shard_grads(self) -> GradShards | None: ...

    def gather_params(self) -> None: ...

    def grad_norm_replicas(self, name: str, param: torch.Tensor) -> int | None: ...


def grad_sharding_layout(layouts: Sequence[ParallelLayout]) -> GradientShardingLayout | None:
    """The one layout of ``layouts`` that can reduce-scatter gradients for the optimizer, or ``None``.

    Raises a one-line ``UserError`` when several can (which one owns a parameter's update would be
    ambiguous).
    """
    found = [layout for layout in layouts if isinstance(layout, GradientShardingLayout)]
    if len(found) > 1:
        names = ", ".join(repr(layout.name) for layout in found)
        raise UserError(
            f"layouts {names} can each hand the optimizer reduce-scattered gradients; at most one layout of "
            "[parallel] layouts may (keep one data-parallel layout)"
        )
    return found[0] if found else None
