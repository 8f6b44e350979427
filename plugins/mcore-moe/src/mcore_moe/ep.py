"""Layout ``ep``: expert parallelism over the ``ep`` mesh dimension, carved out of data parallelism.

Rank ``r`` of ``ep`` keeps experts ``r * E_l .. (r + 1) * E_l - 1`` (``E_l = E / ep``) of every ``moe`` block
(``mcore_moe.block.MoE``): their stacked weights become ``Shard(0)`` DTensors over the ``ep`` sub-mesh
(``ep_experts``), so the optimizer, the gradient norm and ``torch.distributed.checkpoint`` see whole
tensors and a checkpoint saved at ``ep4`` loads at ``ep2`` or on one process. Each block's dispatcher is
swapped for ``[parallel.ep] dispatcher`` (``alltoall``, ``allgather`` or ``allgatherv``) over the ``ep`` group.
Everything else (attention, dense MLPs, routers, shared experts, embeddings) stays whole on every rank.
``apply`` refuses, in one line, experts not divisible by ``ep``, ``ep > 1`` when no rank holds a moe block
(a pipeline stage may hold none), and experts another layout already sharded (``ep`` is listed first).

Data: as torchtitan does, ``ep`` ranks read DIFFERENT micro-batches (``data_parallel()`` answers the ``ep``
group): ``ep`` needs no factor of the world size of its own. The loss is the mean over the ranks'
micro-batch losses, so in ``finish_grad_sync`` (once per step: deferred under ``no_grad_sync``, both
operations being linear):

* dense gradients (each rank's are its own micro-batch's) are averaged over ``ep`` (one all-reduce per dtype);
* expert gradients already hold every rank's tokens (the dispatcher's backward brought them), so they are
  divided by ``ep``.

The gradient norm needs nothing from this layout: expert gradients are ``Shard(0)`` DTensors (each element
counted once), dense ones plain tensors equal on every rank after the average. The routers' aux-loss-free
bias update sums the step's load over every data-parallel group, ``ep``'s included (``mcore.train.step_hooks``).
Capacity and per-rank aux losses stay defined per rank and per micro-batch, as Megatron does.

Composition: ``["ep", "ddp"]`` (ddp averages everything over ``dp_replicate``, ep over ``ep``); ``["ep",
"fsdp"]``: fsdp shards each parameter over ``dp_shard`` (the experts' ep-local rows, as for ``tp``) and
averages over it, and this layout then averages the dense shards over ``ep`` and divides the experts by
``ep``; with ``[parallel.fsdp] borrow = ["ep"]`` fsdp shards the dense parameters over ``dp_shard x ep`` and
averages over both, so a gradient whose DTensor mesh holds every ``ep`` peer is left alone here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.protocols.layout import DataParallelInfo
from mcore.train.grads import mesh_all_reduce
from mcore_moe.block import DISPATCHERS, MoE
from mcore_moe.ep_experts import shard_experts

if TYPE_CHECKING:
    from mcore.mesh import ParallelMesh
    from mcore.protocols.precision import PrecisionRecipe

DIM = "ep"


def declared_experts(model_config: Any) -> list[int]:
    """The ``num_experts`` of every block table of a model config that has one (``[model.moe]``...)."""
    blocks = getattr(model_config, "blocks", None)
    if not isinstance(blocks, Mapping):
        return []
    found = []
    for value in blocks.values():
        n = value.get("num_experts") if isinstance(value, Mapping) else getattr(value, "num_experts", None)
        if isinstance(n, int) and not isinstance(n, bool):
            found.append(n)
    return found


def check_divides(num_experts: int, ep: int, where: str) -> None:
    if num_experts % ep:
        fits = ", ".join(str(d) for d in range(1, num_experts + 1) if num_experts % d == 0)
        raise ValueError(
            f"{where} num_experts = {num_experts} is not divisible by parallel.sizes.ep = {ep}; allowed: ep in {fits}"
        )


class EPLayout:
    """Expert parallelism over ``ep`` (module docstring)."""

    name: ClassVar[str] = "ep"
    mesh_dims: ClassVar[tuple[str, ...]] = (DIM,)
    #: ``apply`` works on a model on the meta device: each rank's expert rows are made on meta, filled later
    supports_meta_init: ClassVar[bool] = True

    @dataclass(kw_only=True, slots=True)
    class Config:
        dispatcher: str = "alltoall"
        """Token dispatcher over the ep group, one of the moe block's: 'alltoall' (routed rows only), 'allgather' (every token, EP x TP friendly) or 'allgatherv' (fixed-capacity buffers, no host sync)."""

        def __post_init__(self) -> None:
            if self.dispatcher not in DISPATCHERS:
                raise ValueError(
                    f"parallel.ep.dispatcher = {self.dispatcher!r}; allowed: {', '.join(map(repr, DISPATCHERS))}"
                )

    @staticmethod
    def check_run(config: Config, run: Any) -> None:
        """Before launch: every MoE table's ``num_experts`` divides by ``parallel.sizes.ep``."""
        ep = run.parallel.sizes.get(DIM)
        if isinstance(ep, int) and ep > 1:
            for n in declared_experts(run.model.config):
                check_divides(n, ep, "model.moe")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or type(self).Config()
        self._mesh: ParallelMesh | None = None
        self._model: nn.Module | None = None
        self._blocks: list[MoE] = []
        self._sync = True

    # -- apply -----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module:
        blocks = [m for m in model.modules() if isinstance(m, MoE)]
        size = mesh.size(DIM)
        if size > 1 and not _on_any_rank(len(blocks), mesh):  # a pipeline stage may hold none: ask every rank
            raise ValueError(
                f"parallel.sizes.ep = {size} but {type(model).__name__} has no moe block to split; allowed: ep = 1, "
                "or a model with moe layers (e.g. model.layers = ['attention/swiglu', 'attention/moe'])"
            )
        for block in blocks:
            check_divides(block.config.num_experts, size, "model.moe")
            sharded = next((n for n, p in block.experts.named_parameters() if isinstance(p, DTensor)), None)
            if size > 1 and sharded is not None:
                raise ValueError(
                    f"ep: the experts' {sharded!r} is already sharded by a layout listed before 'ep'; allowed: 'ep' "
                    "before the layouts that shard parameters (parallel.layouts = ['ep', 'fsdp'] or ['ep', 'ddp'])"
                )
        self._mesh, self._model, self._blocks = mesh, model, blocks
        group = mesh.group(DIM)
        if size == 1 or group is None:
            return model
        device_mesh = mesh.submesh([DIM])
        rank = mesh.rank(DIM)
        for block in blocks:
            shard_experts(block.experts, device_mesh, rank, size)
            block.dispatcher = DISPATCHERS[self.config.dispatcher](group, block.config.num_experts)
        return model

    # -- per step --------------------------------------------------------------------------------
    def data_parallel(self) -> DataParallelInfo:
        """The ``ep`` ranks read different micro-batches."""
        mesh = self._require_mesh()
        return DataParallelInfo(rank=mesh.rank(DIM), size=mesh.size(DIM), group=mesh.group(DIM))

    @contextlib.contextmanager
    def no_grad_sync(self) -> Iterator[None]:
        before = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = before

    def finish_grad_sync(self) -> None:
        """Dense gradients averaged over ``ep``, expert gradients divided by ``ep`` (module docstring)."""
        mesh = self._require_mesh()
        group, size = mesh.group(DIM), mesh.size(DIM)
        if not self._sync or group is None or self._model is None:
            return
        experts = {id(p) for block in self._blocks for p in block.experts.parameters()}
        peers = frozenset(dist.get_process_group_ranks(group))
        covered: dict[int, bool] = {}  # by DTensor mesh: whether it holds every ep peer (reduced over them already)
        dense, routed = [], []
        for p in self._model.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:  # unused on this rank: it still takes part in the average
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            if id(p) in experts:
                routed.append(grad)
                continue
            sub = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            if sub is not None and id(sub) not in covered:
                covered[id(sub)] = peers <= set(sub.mesh.flatten().tolist())
            if sub is None or not covered[id(sub)]:
                dense.append(grad)
        _average_over(dense, group, size)
        if routed:
            torch._foreach_div_(routed, float(size))

    def state_dict_options(self) -> dict[str, Any]:
        """Expert weights are ``Shard(0)`` DTensors: saved sharded, resharded on load."""
        return {"full_state_dict": False}

    def _require_mesh(self) -> ParallelMesh:
        if self._mesh is None:
            raise RuntimeError(f"layout {self.name!r}: apply() has not been called")
        return self._mesh


def _on_any_rank(count: int, mesh: ParallelMesh) -> bool:
    """Whether ``count`` is positive on some rank of ``mesh`` (a collective when distributed)."""
    total = mesh_all_reduce(torch.tensor([float(count)], device=mesh.device), mesh)
    return bool(total.item() > 0)


def _average_over(grads: list[torch.Tensor], group: Any, size: int) -> None:
    """Replace each of ``grads`` in place by its mean over ``group`` (one all-reduce per dtype)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])  # (total,)
        dist.all_reduce(flat, group=group)
        flat /= size
        for g, part in zip(same, flat.split([g.numel() for g in same]), strict=True):
            g.copy_(part.view_as(g))
