"""Layout ``tp``: Megatron-style tensor parallelism over the ``tp`` mesh dimension, applied from outside the model.

Each block declares how its parameters split (``mcore.params.ParamSpec.tp``); ``tp_plan`` reads the
declarations and checks every size before anything is touched; this module carries the plan out:

* ``column`` linears: torch's ``ColwiseParallel`` (weight and bias ``Shard(0)``; the block sees its
  local slice of the outputs and counts heads with ``-1``); ``row`` linears: ``RowwiseParallel``
  (weight ``Shard(1)``, output summed over the group and handed on as a local, whole tensor);
* ``vocab`` embeddings: a ``Shard(0)`` weight and a vocab-parallel lookup (``tp_modules``); the
  output head's weight ``Shard(0)`` and the model's loss head swapped for
  ``model.loss_head.vocab_parallel(group)`` when it has one (else the head stays whole);
* GQA key/value projections with fewer heads than ranks: whole on every rank, each rank projecting
  with its query heads' key/value head (``tp_modules.HeadSliceLinear``). Each rank's gradient of
  such a weight holds its query heads' contribution to the rows of that head and zeros elsewhere,
  so their sum over the group (``finish_grad_sync``; deferred under ``no_grad_sync``) is the
  single-process gradient, the same on every rank; the global norm then counts the plain tensor
  once (the default);
* ``replicate`` parameters (norm scales, biases after a reduction, MLA latent projections) stay
  plain tensors: without sequence parallelism their inputs and output gradients are whole and
  equal on every rank, so their gradients are too.

* ``partial`` parameters (QK-norm scales: whole, each rank's gradient from its own heads) stay
  plain tensors, their gradients summed over the group in ``finish_grad_sync``; a tensor a block
  computes before its heads split and every head reads (MLA's rope key) has its gradient summed
  through ``BlockContext.share_across_heads``: the layout is a ``BatchShardingLayout`` whose
  ``shard_batch`` only puts the group in the context (``head_group``; the loss is not split).

Expert blocks (parameters of role ``expert``: the ``moe`` block) run on a rank's share of the tokens, their
routed experts left whole here (expert TP = 1) for an expert-parallel layout, their router's gradient (and the
experts', unless sharded over the tp ranks) summed over the group (``tp_experts.py``); ``tp > 1`` with expert
blocks needs the ``ep`` layout (any size), which sums what the router counts over the tp ranks too. With
``expert_tp`` the experts' FFN is split over the group instead and expert blocks compute every token.

Every rank of the group reads the same batch (``data_parallel()`` is ``1``). ``apply`` works on a
model on the meta device (it only records placements), and ``mcore.construct.init_params`` fills each
rank's shard and the whole plain tensors with the single-process build's values.

Sequence parallelism (``[parallel.tp] sequence_parallel = true``): the residual stream between
blocks split by tokens (``sequence_parallel.py``). Communication overlap (``overlap_chunks``):
row-parallel linears reduce in token chunks while computing (``tp_overlap.py``); under sequence
parallelism each block's input is gathered in chunks while the GEMMs reading it start on the
chunks that have arrived (``tp_overlap_gather.py``: those column-parallel linears are then our
``ColumnShardLinear``, not ``ColwiseParallel``). Or, under compile, torch's async TP (``async_tp``,
``tp_async.py``): inductor fuses those collectives with their GEMMs. A data-parallel
layout listed after ``tp`` works on each rank's local shards (``["tp", "ddp"]``: ``ddp`` reduces
the local shards over ``dp_replicate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from mcore.protocols.block import BlockContext
from mcore.protocols.layout import DataParallelInfo
from mcore_parallel import tp_async
from mcore_parallel.group_grads import DeferredSync, local_grad, sum_over_group
from mcore_parallel.sequence_parallel import SequencePlan, apply_sequence_parallel, plan_sequence_parallel
from mcore_parallel.tp_experts import (
    expert_grads_to_sum,
    install_expert_tokens,
    plan_expert_tokens,
    sequence_plan,
)
from mcore_parallel.tp_modules import HeadSliceLinear, VocabShardEmbedding, swap_class
from mcore_parallel.tp_overlap import OverlappedRowLinear
from mcore_parallel.tp_overlap_gather import ColumnShardLinear, GatheredInputLinear, GatherRegion
from mcore_parallel.tp_plan import TPPlan, plan_tp

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from mcore.mesh import ParallelMesh
    from mcore.protocols.precision import PrecisionRecipe

DIM = "tp"


class TPLayout(DeferredSync):
    """Tensor parallelism over ``tp`` from the model's ``ParamSpec.tp`` declarations (module docstring)."""

    name: ClassVar[str] = "tp"
    mesh_dims: ClassVar[tuple[str, ...]] = (DIM,)
    #: ``apply`` only records placements on a meta model; ``mcore.construct.init_params`` fills each shard
    supports_meta_init: ClassVar[bool] = True

    @dataclass(kw_only=True, slots=True)
    class Config:
        sequence_parallel: bool = False
        """Split the residual stream between blocks by tokens: norms and residual adds on a rank's
        tokens, all-gather before each block split over heads, reduce-scatter after its row-parallel
        linears (``sequence_parallel.py``); ``train.seq_len`` must divide by the tp size."""

        overlap_chunks: int = 1
        """Row-parallel linears compute their GEMM in this many token chunks, each chunk's reduction
        (all-reduce, or reduce-scatter under sequence parallelism) overlapping the next chunk's GEMM
        (``tp_overlap.py``; 1: off, torch's ``RowwiseParallel``). Under sequence parallelism the
        all-gather side too (``overlap_all_gather``)."""

        overlap_all_gather: bool = True
        """With ``overlap_chunks > 1`` and ``sequence_parallel``: each block's input all-gathered in as
        many chunks, the GEMMs of the linears reading it run on each chunk as it arrives, their input
        gradient reduce-scattered chunk by chunk (``tp_overlap_gather.py``); false: the row side only."""

        async_tp: bool = False
        """torch's async TP under ``train.compile = "blocks"`` (inductor): each block's token all-gather fused with
        the GEMMs reading it and each row-parallel GEMM with its reduce-scatter, decomposed over symmetric memory
        (``tp_async.py``). Needs ``sequence_parallel``, CUDA with symmetric memory, and ``overlap_chunks = 1`` (one
        overlap mechanism); switches inductor's micro-pipeline pass on for the whole process."""

        expert_tp: bool = False
        """Split the routed experts' FFN over tp too (expert TP = attention TP): expert blocks then compute every
        token as attention does, their stacked weights split along the FFN (``tp_experts.py``); false: each
        rank routes its own share of the tokens through whole experts (expert TP = 1)."""

        def __post_init__(self) -> None:
            if not isinstance(self.expert_tp, bool):
                raise ValueError(f"parallel.tp.expert_tp = {self.expert_tp!r}; allowed: true or false")
            if not isinstance(self.sequence_parallel, bool):
                raise ValueError(f"parallel.tp.sequence_parallel = {self.sequence_parallel!r}; allowed: true or false")
            if not isinstance(self.overlap_all_gather, bool):
                raise ValueError(
                    f"parallel.tp.overlap_all_gather = {self.overlap_all_gather!r}; allowed: true or false"
                )
            chunks = self.overlap_chunks
            if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= 64:
                raise ValueError(f"parallel.tp.overlap_chunks = {chunks!r}; allowed: an integer from 1 (off) to 64")
            if not isinstance(self.async_tp, bool):
                raise ValueError(f"parallel.tp.async_tp = {self.async_tp!r}; allowed: true or false")
            if self.async_tp and not self.sequence_parallel:
                raise ValueError(
                    "parallel.tp.async_tp = true needs parallel.tp.sequence_parallel = true (torch fuses the "
                    "all-gathers and reduce-scatters of sequence parallelism); allowed: async_tp = false, or both true"
                )
            if self.async_tp and chunks > 1:
                raise ValueError(
                    f"parallel.tp.async_tp = true with parallel.tp.overlap_chunks = {chunks}: two overlap mechanisms; "
                    "allowed: one of them (async_tp = false, or overlap_chunks = 1)"
                )

    @staticmethod
    def check_run(config: Config, run: Any) -> None:
        """Under sequence parallelism ``train.seq_len`` must split over the tp size (when the config gives it);
        ``async_tp`` needs the blocks compiled by inductor (its pass does the fusing)."""
        if config.async_tp and (run.train.compile != "blocks" or run.train.compile_backend != "inductor"):
            raise ValueError(
                f"parallel.tp.async_tp = true with train.compile = {run.train.compile!r} (train.compile_backend = "
                f"{run.train.compile_backend!r}): torch's async TP is an inductor pass over the compiled blocks; "
                "allowed: train.compile = 'blocks' with train.compile_backend = 'inductor', or parallel.tp.async_tp = false"
            )
        tp = run.parallel.sizes.get(DIM)
        seq_len = run.train.seq_len
        if config.sequence_parallel and isinstance(tp, int) and tp > 1 and seq_len % tp:
            raise ValueError(
                f"train.seq_len = {seq_len} does not split over parallel.sizes.tp = {tp} under "
                f"parallel.tp.sequence_parallel = true; allowed: a train.seq_len that is a multiple of {tp}"
            )

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or type(self).Config()
        self._mesh: ParallelMesh | None = None
        self._plan: TPPlan | None = None
        self._sequence_plan: SequencePlan | None = None
        self._summed: list[tuple[nn.Module, str]] = []  # (module, attribute): read at each sync
        self._experts: list[tuple[nn.Module, str]] = []  # expert weights: summed unless sharded over tp
        self._regions: list[GatherRegion] = []  # the all-gather side of overlap: calls dropped after backward

    # -- apply -----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module:
        tp = mesh.size(DIM)
        loss_head = getattr(model, "loss_head", None)
        vocab_parallel = callable(getattr(loss_head, "vocab_parallel", None))
        expert_tp = self.config.expert_tp
        plan = plan_tp(model, tp, vocab_parallel_loss=vocab_parallel, expert_tp=expert_tp)  # every check first
        experts = plan_expert_tokens(model, plan)
        sp = None
        if self.config.sequence_parallel:  # expert blocks run on the rank's tokens: not gathered (tp_experts)
            sp = sequence_plan(plan_sequence_parallel(model, plan, token_wise=experts.blocks), experts)
        if tp > 1 and experts.blocks and not experts.split and not mesh.has("ep"):
            raise ValueError(
                f"tp: {experts.blocks[0]!r} holds expert parameters ({plan.experts[0]!r}), whose tokens tp splits over "
                "its ranks; allowed: with layout 'ep' too (parallel.layouts = ['tp', 'ep'], any parallel.sizes.ep)"
            )
        self._mesh, self._plan, self._sequence_plan = mesh, plan, sp
        if tp == 1:
            return model  # the plain model: nothing to split, nothing to reduce
        if self.config.async_tp:  # before anything changes
            why = tp_async.unavailable(mesh.device_type)
            if why is not None:
                raise ValueError(
                    f"parallel.tp.async_tp = true, but {why}; allowed: parallel.tp.async_tp = false (or "
                    "parallel.tp.overlap_chunks > 1 for the chunked overlap, which runs anywhere)"
                )
        device_mesh, group, rank = mesh.submesh([DIM]), mesh.group(DIM), mesh.rank(DIM)
        assert device_mesh is not None
        if self.config.async_tp:  # before the blocks' first call traces them
            tp_async.enable(group)
        owners = _owners(model)
        # the all-gather side of overlap: a region's column-parallel linears compute on its chunked gather
        overlap_gather = self.config.overlap_chunks > 1 and self.config.overlap_all_gather
        gathered = sp.regions if sp is not None and overlap_gather else []
        for path in plan.colwise:
            if _inside(path, gathered):
                self._column_shard(model.get_submodule(path), device_mesh, owners)
                continue
            _parallelize(model, path, device_mesh, ColwiseParallel(), owners)
        for path in plan.rowwise:  # under sequence parallelism a block's outputs are reduce-scattered by tokens
            by_tokens = (sp is not None and path in sp.row_outputs) or path in experts.row_outputs
            if self.config.overlap_chunks > 1:
                self._overlap_row(model, path, device_mesh, owners, by_tokens=by_tokens)
                continue
            style = RowwiseParallel(output_layouts=Shard(1)) if by_tokens else RowwiseParallel()
            _parallelize(model, path, device_mesh, style, owners)
        for path in plan.vocab_embeddings:
            embedding = model.get_submodule(path)
            assert isinstance(embedding, nn.Embedding)
            _shard(embedding.weight, device_mesh, owners)
            start = rank * (embedding.num_embeddings // tp)
            swap_class(embedding, VocabShardEmbedding, tp_group=group, vocab_start=start)
        for name in plan.vocab_shards:
            _shard(model.get_parameter(name), device_mesh, owners)
        for path, (heads, head_rows) in plan.head_slices.items():
            linear = model.get_submodule(path)
            head = rank * heads // tp  # query heads split contiguously: rank r's read this key/value head
            swap_class(linear, HeadSliceLinear, tp_group=group, rows=(head * head_rows, (head + 1) * head_rows))
            self._summed.extend((linear, k) for k, p in linear.named_parameters(recurse=False) if p.requires_grad)
        for name in plan.summed:  # whole on every rank, each rank's gradient from its own heads
            path, _, key = name.rpartition(".")
            if model.get_parameter(name).requires_grad:
                self._summed.append((model.get_submodule(path), key))
        for name, dim in plan.expert_splits.items():  # expert TP: the FFN of every expert split over the ranks
            param = model.get_parameter(name)
            if isinstance(param, DTensor):
                raise ValueError(
                    f"tp: expert weight {name!r} is already sharded by a layout listed before 'tp'; allowed with "
                    "parallel.tp.expert_tp = true: 'tp' before 'ep' (parallel.layouts = ['tp', 'ep'])"
                )
            _shard(param, device_mesh, owners, dim=dim)
        for name in experts.summed:  # an expert block's router sees the rank's tokens only
            path, _, key = name.rpartition(".")
            if model.get_parameter(name).requires_grad:
                self._summed.append((model.get_submodule(path), key))
        for name in plan.experts:  # summed unless a layout shards them over the tp ranks (read at each sync)
            path, _, key = name.rpartition(".")
            if model.get_parameter(name).requires_grad:
                self._experts.append((model.get_submodule(path), key))
        install_expert_tokens(model, experts, group, rank, tp, sequence_parallel=sp is not None)
        if sp is not None:  # norm scales see their rank's tokens only: gradients summed over the group
            for name in sp.summed:
                path, _, key = name.rpartition(".")
                self._summed.append((model.get_submodule(path), key))
            apply_sequence_parallel(model, sp, group, rank, tp, self._gather_regions(model, plan, gathered))
        if vocab_parallel:
            model.loss_head = loss_head.vocab_parallel(group)  # type: ignore[union-attr]
        return model

    def _overlap_row(
        self, model: nn.Module, path: str, device_mesh: DeviceMesh, owners: Any, *, by_tokens: bool
    ) -> None:
        """A row-parallel linear whose reduction overlaps its chunked GEMM (``tp_overlap``): weight
        ``Shard(1)``, bias plain (summed over the group when it sees a rank's tokens only)."""
        linear = model.get_submodule(path)
        assert isinstance(linear, nn.Linear)
        _shard(linear.weight, device_mesh, owners, dim=1)
        mesh = self._require_mesh()
        swap_class(
            linear,
            OverlappedRowLinear,
            tp_group=mesh.group(DIM),
            tp_world=mesh.size(DIM),
            overlap_chunks=self.config.overlap_chunks,
            sequence_parallel=by_tokens,
        )
        if by_tokens and linear.bias is not None and linear.bias.requires_grad:
            self._summed.append((linear, "bias"))

    def _column_shard(self, linear: nn.Module, device_mesh: DeviceMesh, owners: Any) -> None:
        """A column-parallel linear inside a gathered region: weight and bias ``Shard(0)``, no input hook."""
        assert isinstance(linear, nn.Linear)
        _shard(linear.weight, device_mesh, owners)
        if linear.bias is not None:
            _shard(linear.bias, device_mesh, owners)
        swap_class(linear, ColumnShardLinear, tp_group=self._require_mesh().group(DIM))

    def _gather_regions(self, model: nn.Module, plan: TPPlan, regions: list[str]) -> dict[str, GatherRegion]:
        """Each region's chunked gather (``tp_overlap_gather``), its candidates the linears inside it that
        may read its input: column-parallel, head slices, replicated (not the row-parallel ones)."""
        mesh = self._require_mesh()
        whole = set(plan.whole)
        out: dict[str, GatherRegion] = {}
        for path in regions:
            module = model.get_submodule(path)
            region = GatherRegion(
                group=mesh.group(DIM),
                rank=mesh.rank(DIM),
                world=mesh.size(DIM),
                chunks=self.config.overlap_chunks,
                rerun="forward" in vars(module),  # wrapped on the instance: train.recompute = "selective"
            )
            for name, linear in module.named_modules(prefix=path):
                if not isinstance(linear, nn.Linear):
                    continue
                if name in plan.colwise or name in plan.head_slices or f"{name}.weight" in whole:
                    swap_class(linear, GatheredInputLinear, tp_gather=region)
                    region.candidates.append(linear)
            out[path] = region
            self._regions.append(region)
        return out

    # -- the context: the ranks holding the other heads --------------------------------------------
    def shard_batch(
        self, tokens: torch.Tensor, labels: torch.Tensor, ctx: BlockContext
    ) -> tuple[torch.Tensor, torch.Tensor, BlockContext]:
        """Every rank computes the whole batch; the context names the group that holds the other heads
        (``BlockContext.head_group``: a tensor all heads read gets its gradient summed over it)."""
        group = self._require_mesh().group(DIM)
        return tokens, labels, ctx if group is None else dataclasses.replace(ctx, head_group=group)

    def loss_group(self) -> None:
        """The loss is not split: every rank computes all of it."""
        return None

    @property
    def plan(self) -> TPPlan:
        """What ``apply`` did to each module (``tp_plan.TPPlan``)."""
        if self._plan is None:
            raise RuntimeError(f"layout {self.name!r}: apply() has not been called")
        return self._plan

    # -- per step --------------------------------------------------------------------------------
    def data_parallel(self) -> DataParallelInfo:
        """Every rank of the group reads the same batch."""
        return DataParallelInfo(rank=0, size=1)

    def finish_grad_sync(self) -> None:
        """Sum over the group the gradients of key/value projections kept whole (GQA, ``kv_heads < tp``)
        and of ``partial`` parameters (QK-norm scales); drop what the chunked gathers kept for a recompute."""
        for region in self._regions:  # outputs kept for a recompute that never took them
            region.reset()
        if not self.syncing or not (self._summed or self._experts):
            return
        # read through the holders: a layout applied after this one (fsdp, ep) may have replaced the parameters
        group = self._require_mesh().group(DIM)
        params = [module._parameters[key] for module, key in self._summed]
        experts = [module._parameters[key] for module, key in self._experts]
        grads = [local_grad(p) for p in params if p is not None]
        grads += expert_grads_to_sum([p for p in experts if p is not None], group)
        sum_over_group(grads, group)

    def state_dict_options(self) -> dict[str, Any]:
        """Split parameters are DTensors: saved sharded, resharded on load; plain ones are saved once."""
        return {"full_state_dict": False, "cpu_offload": False}

    def grad_norm_replicas(self, name: str, param: torch.Tensor) -> int | None:
        """The default: DTensors by their placements, plain tensors (equal on every rank after
        ``finish_grad_sync``) once."""
        return None

    def _require_mesh(self) -> ParallelMesh:
        if self._mesh is None:
            raise RuntimeError(f"layout {self.name!r}: apply() has not been called")
        return self._mesh


def _inside(path: str, regions: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in regions)


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every ``(module, attribute)`` holding each parameter (a tied weight has several)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, key))
    return out


def _rebind(old: torch.Tensor, new: nn.Parameter, owners: dict[int, list[tuple[nn.Module, str]]]) -> None:
    for module, key in owners.get(id(old), []):
        module.register_parameter(key, new)
    owners[id(new)] = owners.pop(id(old), [])


def _shard(
    param: torch.Tensor, device_mesh: DeviceMesh, owners: dict[int, list[tuple[nn.Module, str]]], dim: int = 0
) -> None:
    """Replace ``param`` (in every module holding it) by its ``Shard(dim)`` DTensor over ``device_mesh``."""
    new = nn.Parameter(distribute_tensor(param.data, device_mesh, [Shard(dim)]), requires_grad=param.requires_grad)
    _rebind(param, new, owners)


def _parallelize(
    model: nn.Module, path: str, device_mesh: DeviceMesh, style: Any, owners: dict[int, list[tuple[nn.Module, str]]]
) -> None:
    """Apply a torch parallel style to the module at ``path``, keeping any other holder of its parameters tied."""
    module = model.get_submodule(path)
    before = dict(module._parameters)
    parallelize_module(module, device_mesh, style)
    for key, old in before.items():
        new = module._parameters.get(key)
        if old is not None and new is not None and new is not old:
            _rebind(old, new, owners)
