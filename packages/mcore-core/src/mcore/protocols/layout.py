"""Parallel layouts: how a plain model is spread over a device mesh.

A run lists layouts by name in ``[parallel] layouts`` and the core applies them in that
order, exactly as a user would by hand (``tp`` then ``fsdp``). Each layout owns some named
dimensions of the ``ParallelMesh`` and touches nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.distributed import ProcessGroup

    from mcore.mesh import ParallelMesh
    from mcore.protocols.block import BlockContext
    from mcore.protocols.precision import PrecisionRecipe


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """What one pipeline rank holds, for ``mcore plan`` (``ScheduledLayout.stage_plan``).

    ``rank``: its index along the layout's dimension; ``chunks``: the model layer indices of each stage it
    runs (one chunk, or ``virtual_stages`` chunks); ``first``/``last``: whether it runs the embedding /
    the loss head (final norm, output weight, MTP depths); ``in_flight``: the most (micro-batch, chunk)
    forwards whose activations it keeps at once under the schedule (1F1B: ``pp - rank``).
    """

    rank: int
    chunks: tuple[tuple[int, ...], ...]
    first: bool
    last: bool
    in_flight: int


@dataclass(frozen=True, kw_only=True)
class DataParallelInfo:
    """Where this rank sits among the replicas that see different data.

    ``rank``/``size`` index the data-parallel ranks (all ranks that must read different
    batches: replicate x shard dims, and the context-parallel dim reads the same batch).
    ``group`` is the process group spanning them (``None`` when ``size == 1``).
    """

    rank: int
    size: int
    group: ProcessGroup | None = None


@runtime_checkable
class ParallelLayout(Protocol):
    """A parallelization transform, registered under kind ``"layout"``.

    Lifecycle: the core builds the layout from its ``Config`` (section
    ``[parallel.<name>]``), then calls ``apply`` once, then uses the other methods every step.

    Contract:
        * ``mesh_dims``: names of the mesh dimensions this layout owns (``("dp_shard",)``
          for ``fsdp``, ``("tp",)`` for ``tp``, ``()`` for ``single``). The core builds the
          mesh with these names; two layouts may not own the same dimension.
        * ``apply(model, mesh, precision)``: parallelizes ``model`` in place or returns a
          wrapper; afterwards each parameter is either a plain tensor (replicated on this
          dimension) or a ``DTensor`` over this layout's sub-mesh. It may ask ``precision``
          how to gather parameters (``precision.gather_payload``). It must not change the
          model's math: loss and gradients equal the single-process run up to reduction
          order.
        * ``data_parallel()``: this rank's data-parallel position, as seen by this layout
          (layouts that do not split data return ``rank=0, size=1``); the core multiplies
          them across layouts to shard data.
        * ``no_grad_sync()``: context manager that defers gradient synchronisation during
          the micro-batches of a gradient-accumulation step; the next backward outside it
          synchronises everything accumulated.
        * ``finish_grad_sync()``: called after the last backward of a step and before the
          optimizer, for the layouts in the reverse order of ``[parallel] layouts`` (the
          outermost, applied last, first: ``["tp", "fsdp"]`` lands fsdp's reduce-scatter before
          ``tp`` sums over its group); waits for asynchronous reductions. Gradients are then averaged over
          the data-parallel ranks (sum divided by DP size, unless the layout documents a
          different divisor, e.g. for expert parameters).
        * A data-parallel layout may also implement ``GradientShardingLayout``
          (``mcore.protocols.sharded_grads``): when an optimizer asks at build time
          (``shard_grads()``), ``finish_grad_sync`` reduce-scatters instead, leaving in ``.grad``
          the averaged gradient on this rank's elements and zeros elsewhere (``grad_norm_replicas``
          answers 1), and the optimizer calls ``gather_params()`` after its update (ZeRO-1).
        * ``state_dict_options()``: hints for ``torch.distributed.checkpoint`` (e.g. full vs
          sharded); parameters that are DTensors are saved sharded and reshard on load.
        * optional ``grad_norm_replicas(name, param) -> int | None``: how many ranks of this
          layout's mesh dimensions hold the same gradient values of ``param`` (the global
          gradient norm and clipping count each element once). ``None`` (or no method): the
          default — a ``DTensor``'s placements decide, a plain tensor is on every rank. ``pp``
          answers 1 for a stage's own parameters and 2 for an embedding tied across the first
          and last stage; ``ep`` needs no answer: its experts are ``Shard(0)`` DTensors, counted by the default.
        * optional ``borrowed_dims``: mesh dimensions owned by another layout that this one also
          works over (``fsdp`` sharding over ``dp_shard`` x ``cp``, as torchtitan does); the core
          checks another layout owns each and ``ParallelMesh.submesh`` gives the flattened mesh.
        * optional class attribute ``supports_meta_init = True``: ``apply`` works on a model on
          the meta device, allocating on the mesh's device only each rank's part of every
          parameter (uninitialised or zeroed); the core then fills those parts
          (``mcore.construct.init_params``). Without it the model is built whole on every rank.
    """

    name: ClassVar[str]
    mesh_dims: ClassVar[tuple[str, ...]]

    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module: ...

    def data_parallel(self) -> DataParallelInfo: ...

    def no_grad_sync(self) -> AbstractContextManager[None]: ...

    def finish_grad_sync(self) -> None: ...

    def state_dict_options(self) -> dict[str, Any]: ...


@runtime_checkable
class BatchShardingLayout(ParallelLayout, Protocol):
    """A layout that changes which part of a batch each rank computes (``cp``, sequence parallel).

    The run loop calls ``shard_batch(tokens, labels, ctx)`` on every micro-batch (training and
    evaluation), in the order of ``[parallel] layouts``, before the model. It receives the
    micro-batch every rank of the layout's group holds — ``tokens``/``labels`` ``(B, T)`` int64
    and a ``BlockContext`` with ``positions``/``cu_seqlens`` — and returns this rank's part with a
    consistent context (e.g. ``cp`` with zig-zag balance: chunks ``r`` and ``2 * cp - 1 - r`` of
    every document, positions kept global so rotary embeddings stay right, and
    ``ctx.attention`` set to an ``AttentionBackend`` that sees the other ranks' keys). The context
    it returns is a new one (``dataclasses.replace``): contexts are frozen. Dynamic CP may pick
    its split per batch here.

    ``loss_group()`` is the group of ranks holding parts of one micro-batch (``None`` when the
    layout does not split the loss). The loop puts it in ``ctx.loss_group``: the model divides
    its loss sum by the label count over the group (``BlockContext.label_count``), so the ranks'
    losses, and their gradients, add up to the micro-batch's; the layout sums the gradients over
    the group (``finish_grad_sync``), and the loop sums the logged loss over it. At most one
    layout of a run splits the loss.
    """

    def shard_batch(
        self, tokens: torch.Tensor, labels: torch.Tensor, ctx: BlockContext
    ) -> tuple[torch.Tensor, torch.Tensor, BlockContext]: ...

    def loss_group(self) -> ProcessGroup | None: ...


@runtime_checkable
class ScheduledLayout(ParallelLayout, Protocol):
    """A layout that owns the forward/backward schedule of a step (``pp``: 1F1B, interleaved).

    ``forward_backward(model, micro_batches, *, precision, no_grad_sync)`` runs forward and
    backward of every micro-batch ``(tokens, labels, ctx)`` (already through the batch-sharding
    layouts) in the layout's schedule: each forward under ``precision.autocast()``, each backward
    of ``precision.scale_loss(loss / len(micro_batches))`` (and of the stage's auxiliary losses,
    scaled alike), all but the last micro-batch's backward inside ``no_grad_sync()`` (the other
    layouts' deferral, one context manager). Gradients accumulate in ``.grad`` as with a plain
    loop. It returns the mean loss over the micro-batches as a 0-d fp32 tensor, valid on every
    rank of the pipeline (the last stage broadcasts it). ``forward_only(model, micro_batches, *,
    precision)`` does the same without backward (evaluation). The run loop calls them instead of
    its own micro-batch loop when a layout implements them; at most one layout of a run may.
    ``model`` is what the layouts' ``apply`` returned (this rank's stage). Each micro-batch's
    model call gets its own ``AuxLosses`` collector: one context's collector is never shared
    across micro-batches.

    Optional: ``stage_plan(size, layers, micro_batches) -> list[StagePlan]``, one per rank of the layout's
    dimension of ``size`` ranks, for a model of ``layers`` stage layers run with ``micro_batches`` per step
    (from the layout's config alone, before any process group): ``mcore plan`` shows each rank's memory.
    """

    def forward_backward(
        self,
        model: nn.Module,
        micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor, BlockContext]],
        *,
        precision: PrecisionRecipe,
        no_grad_sync: Callable[[], AbstractContextManager[None]],
    ) -> torch.Tensor: ...

    def forward_only(
        self,
        model: nn.Module,
        micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor, BlockContext]],
        *,
        precision: PrecisionRecipe,
    ) -> torch.Tensor: ...
