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

With ``tp`` (``["tp", "ep"]``, with or without sequence parallelism; expert TP = 1): ``tp`` splits attention and
dense MLPs, the moe block's shared experts as it declares, and runs each moe block on a tp rank's share of the
tokens (``mcore_parallel.tp_experts``); this layout hands the blocks the tp group (``MoE.split_tokens_over``:
loads summed over it, auxiliary losses averaged, capacity per tp rank). The experts' gradients then hold a tp
rank's share of the tokens: ``tp`` sums them over its group, unless they are sharded over it. MoE parallel
folding (``[parallel.ep] borrow = ["tp"]``, Megatron's expert parallelism over the attention's tp ranks): the
experts are ``Shard(0)`` over the flattened ``ep x tp`` ranks (rank ``e * tp + t``) and the tokens dispatched over
that group, so ``tp`` alone (``ep = 1``) runs expert parallelism with no data-parallel factor; the experts'
gradients then hold every token of the ``ep`` ranks' micro-batches (divided by ``ep`` as above). With expert TP
(``[parallel.tp] expert_tp = true``, ``tp`` listed first) the tokens are not split: ``tp`` splits the experts'
FFN, and each weight here becomes ``(Shard(0), Shard(d))`` over ``(ep, tp)``.

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
from mcore_moe.ep_experts import shard_experts, split_over_tp

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


def check_divides(num_experts: int, ep: int, where: str, what: str = "parallel.sizes.ep") -> None:
    if num_experts % ep:
        fits = ", ".join(str(d) for d in range(1, num_experts + 1) if num_experts % d == 0)
        name = "ep" if what == "parallel.sizes.ep" else "ep x tp"
        raise ValueError(
            f"{where} num_experts = {num_experts} is not divisible by {what} = {ep}; allowed: {name} in {fits}"
        )


#: What ``borrow`` may name.
BORROWABLE = ((), ("tp",))


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

        borrow: tuple[str, ...] = ()
        """Mesh dimensions of other layouts the experts are sharded over too: [] or ['tp'] (MoE parallel folding:
        experts Shard(0) over ep x tp, tokens dispatched over that group, so tp alone can run expert parallelism)."""

        def __post_init__(self) -> None:
            if isinstance(self.borrow, str):
                self.borrow = (self.borrow,) if self.borrow else ()
            self.borrow = tuple(self.borrow)
            if self.borrow not in BORROWABLE:
                raise ValueError(f"parallel.ep.borrow = {list(self.borrow)!r}; allowed: [] or ['tp']")
            if self.dispatcher not in DISPATCHERS:
                raise ValueError(
                    f"parallel.ep.dispatcher = {self.dispatcher!r}; allowed: {', '.join(map(repr, DISPATCHERS))}"
                )

    @staticmethod
    def check_run(config: Config, run: Any) -> None:
        """Before launch: every MoE table's ``num_experts`` divides by ``parallel.sizes.ep``."""
        ep = run.parallel.sizes.get(DIM, 1)
        tp = run.parallel.sizes.get("tp", 1) if "tp" in config.borrow else 1
        if isinstance(ep, int) and isinstance(tp, int) and ep > 0 and tp > 0 and ep * tp > 1:
            what = "parallel.sizes.ep x parallel.sizes.tp" if "tp" in config.borrow else "parallel.sizes.ep"
            for n in declared_experts(run.model.config):
                check_divides(n, ep * tp, "model.moe", what)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or type(self).Config()
        self._mesh: ParallelMesh | None = None
        self._model: nn.Module | None = None
        self._blocks: list[MoE] = []
        self._sync = True

    @property
    def borrowed_dims(self) -> tuple[str, ...]:
        """Mesh dimensions of another layout the experts are also sharded over (``Config.borrow``)."""
        return self.config.borrow

    # -- apply -----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module:
        blocks = [m for m in model.modules() if isinstance(m, MoE)]
        folded = "tp" in self.config.borrow
        size = mesh.size(DIM) * (mesh.size("tp") if folded else 1)  # ranks the experts are sharded over
        what = "parallel.sizes.ep x parallel.sizes.tp" if folded else "parallel.sizes.ep"
        if size > 1 and not _on_any_rank(len(blocks), mesh):  # a pipeline stage may hold none: ask every rank
            raise ValueError(
                f"{what} = {size} but {type(model).__name__} has no moe block to split; allowed: ep = 1, "
                "or a model with moe layers (e.g. model.layers = ['attention/swiglu', 'attention/moe'])"
            )
        split = [split_over_tp(block.experts) for block in blocks]  # expert TP: tp split the FFN, not the tokens
        for block, by_tp in zip(blocks, split, strict=True):
            check_divides(block.config.num_experts, size, "model.moe", what)
            if by_tp and folded:
                raise ValueError(
                    "ep: parallel.ep.borrow = ['tp'] with the experts' FFN split over tp (parallel.tp.expert_tp = "
                    "true); allowed: one of them (experts over ep x tp, or experts over ep with their FFN over tp)"
                )
            sharded = next(
                (n for n, p in block.experts.named_parameters() if isinstance(p, DTensor) and not by_tp), None
            )
            if size > 1 and sharded is not None:
                raise ValueError(
                    f"ep: the experts' {sharded!r} is already sharded by a layout listed before 'ep'; allowed: 'ep' "
                    "before the layouts that shard parameters (parallel.layouts = ['ep', 'fsdp'] or ['ep', 'ddp'])"
                )
        self._mesh, self._model, self._blocks = mesh, model, blocks
        tp_group = mesh.group("tp")
        if tp_group is not None:  # tp splits the blocks' tokens over its ranks (mcore_parallel.tp_experts)
            for block, by_tp in zip(blocks, split, strict=True):
                if not by_tp:
                    block.split_tokens_over(tp_group)
        if size == 1 or mesh.device_mesh is None:
            return model
        if folded:  # one flattened dimension over ep x tp (ep outer): rank e * tp + t
            device_mesh = mesh.submesh([DIM, "tp"])._flatten(f"{DIM}_tp")  # type: ignore[union-attr]
            group, rank = device_mesh.get_group(), device_mesh.get_local_rank()
        else:
            device_mesh, group, rank = mesh.submesh([DIM]), mesh.group(DIM), mesh.rank(DIM)
        tp_mesh = mesh.submesh([DIM, "tp"]) if any(split) else None  # expert TP: (ep, tp) placements
        for block in blocks:
            shard_experts(block.experts, device_mesh, rank, size, tp_mesh)
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
