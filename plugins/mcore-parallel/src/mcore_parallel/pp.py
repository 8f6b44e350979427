"""Layout ``pp``: pipeline parallelism over the ``pp`` mesh dimension (a ``ScheduledLayout``).

``apply`` cuts a ``StagedModel`` into ``pp * virtual_stages`` stages (``pp_split``: an even split,
``first_stage_layers``/``last_stage_layers``, or an explicit ``split``) and keeps this rank's:
stage ``r`` (or, interleaved, stages ``r, r + pp, ...`` in one ``StageChunks`` module whose
parameters keep the FULL model's names, no ``chunk.0.`` prefix). ``forward_backward`` walks this
rank's list of the schedule (``pp_schedule``: ``1f1b``, ``interleaved``, ``zb-h1``), sending
activations and their gradients with non-blocking point-to-point transfers (``pp_comm``). Each
micro-batch's stage call gets its own ``AuxLosses``; a stage other than the last backpropagates its
auxiliary losses with the loss's scale. Each stage's backwards run inside the other layouts'
``no_grad_sync`` except its last one of the step, so a data-parallel layout reduces once per step.
The loss of the step (the last stage's losses plus the other stages' auxiliary losses, over the
micro-batches) is summed over the group: every rank reports it. ``forward_only`` (evaluation) runs
each rank's stages micro-batch by micro-batch, for any micro-batch count.

Tied weights: when the last stage also holds the embedding (tied output weight, MTP), the first
and the last stage hold two copies of one parameter under one name; ``finish_grad_sync`` sums their
gradients (a point-to-point exchange between the two ranks), so both copies take the same update,
and ``grad_norm_replicas`` counts them once. ``zb-h1`` defers the weight gradients of plain linears
(``pp_grad``). Checkpoints hold each stage's parameters under the model's names, so a ``pp2`` run
resumes under ``pp1`` and the other way.

Composition: ``pp`` is listed first (``["pp", "tp"]``, ``["pp", "fsdp"]``): the other layouts see one
stage (or one ``StageChunks``) as their model; ``fsdp`` then reduce-scatters each stage's gradients
once, in the stage's last backward; ``cp`` splits each micro-batch before the schedule, every stage
alike (tested: pp2 x fsdp2, pp2 x tp2, pp2 x cp2, each with every schedule it allows). A tied embedding laid out
differently on the two stages (``tp`` splits the last stage's by vocabulary rows) is summed through
full tensors. ``ddp`` follows the same contract but is not tested with ``pp`` yet. ``zb-h1`` is
refused with ``fsdp``/``hsdp``/``ddp`` (``pp_grad``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mcore.errors import UserError
from mcore.protocols.block import AuxLosses, BlockContext
from mcore.protocols.layout import DataParallelInfo, StagePlan
from mcore_parallel.pp_comm import StageComm
from mcore_parallel.pp_grad import WeightGradStore, defer_linears
from mcore_parallel.pp_schedule import (
    SCHEDULES,
    Action,
    build,
    channel_orders,
    forwards_only,
    simulate,
    unit_costs,
    with_comms,
)
from mcore_parallel.pp_split import check_micro_batches, rank_stages, stage_counts, stage_ranges

if TYPE_CHECKING:
    from mcore.mesh import ParallelMesh
    from mcore.protocols.precision import PrecisionRecipe

DIM = "pp"
MicroBatch = tuple[torch.Tensor, torch.Tensor, BlockContext]
DATA_PARALLEL_LAYOUTS = ("fsdp", "hsdp", "ddp")


class StageChunks(nn.Module):
    """The stages an interleaved rank holds, as one module: the chunks' children merged under their own
    names (``layers`` one ``ModuleDict`` keyed by model index), so ``named_parameters`` are the FULL
    model's; ``forward(..., chunk=c)`` runs chunk ``c``."""

    def __init__(self, chunks: Sequence[nn.Module]) -> None:
        super().__init__()
        self._chunks = list(chunks)  # a plain list: no "chunks.0." prefix in the names
        heads = []
        for chunk in chunks:
            for name, child in chunk.named_children():
                if name == "loss_head":
                    heads.append(child)
                    continue
                have = self._modules.get(name)
                if have is None:
                    self._modules[name] = (
                        nn.ModuleDict(dict(child.items())) if isinstance(child, nn.ModuleDict) else child
                    )
                elif isinstance(have, nn.ModuleDict) and isinstance(child, nn.ModuleDict):
                    have.update(dict(child.items()))
                elif have is not child:
                    raise ValueError(f"pp: two chunks hold different modules named {name!r}")
        for head in heads:  # last: it reaches the norm and head, whose names must stay their own
            self._modules["loss_head"] = head

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "loss_head":  # a layout swapping the head (tp's vocab-parallel loss) swaps the last chunk's
            for chunk in self._chunks:
                if hasattr(chunk, "loss_head"):
                    chunk.loss_head = value

    @property
    def chunks(self) -> tuple[nn.Module, ...]:
        return tuple(self._chunks)

    def param_specs(self) -> dict[str, Any]:
        specs: dict[str, Any] = {}
        for chunk in self._chunks:
            own = getattr(chunk, "param_specs", None)
            if callable(own):
                specs.update(own())
        return specs

    def forward(
        self,
        inputs: torch.Tensor,
        *,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        ctx: BlockContext | None = None,
        chunk: int = 0,
    ) -> torch.Tensor:
        return self._chunks[chunk](inputs, tokens=tokens, labels=labels, ctx=ctx)  # type: ignore[no-any-return]


@dataclass
class _StepState:
    """What one step's walk through the schedule holds (never shared between steps)."""

    inputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    outputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    aux: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    mailbox: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)


class PPLayout:
    """Pipeline parallelism over ``pp``: 1F1B, interleaved 1F1B, ZB-H1 (module docstring)."""

    name: ClassVar[str] = "pp"
    mesh_dims: ClassVar[tuple[str, ...]] = (DIM,)

    @dataclass(kw_only=True, slots=True)
    class Config:
        schedule: str = "1f1b"
        """'1f1b', 'interleaved' (virtual_stages chunks per rank, looped placement) or 'zb-h1' (zero bubble:
        weight gradients of plain linears deferred to fill the bubbles; not with fsdp, hsdp or ddp)."""
        virtual_stages: int = 1
        """Stages per rank under schedule = 'interleaved' (>= 2 there, 1 otherwise)."""
        split: list[int] | None = None
        """Layers of each of the pp * virtual_stages stages, in order (none: first/last_stage_layers, else even)."""
        first_stage_layers: int | None = None
        """Layers of the first stage (it also runs the embedding); the others share the rest evenly."""
        last_stage_layers: int | None = None
        """Layers of the last stage (it also runs the final norm, loss and MTP depths)."""

        def __post_init__(self) -> None:
            if self.schedule not in SCHEDULES:
                raise ValueError(
                    f"parallel.pp.schedule = {self.schedule!r}; allowed: {', '.join(map(repr, SCHEDULES))}"
                )
            v = self.virtual_stages
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.pp.virtual_stages = {v!r}; allowed: an int >= 1")
            if self.schedule == "interleaved" and v < 2:
                raise ValueError(
                    f"parallel.pp.virtual_stages = {v} with schedule = 'interleaved'; allowed: >= 2 "
                    "(or schedule = '1f1b' for one stage per rank)"
                )
            if self.schedule != "interleaved" and v != 1:
                raise ValueError(
                    f"parallel.pp.virtual_stages = {v} with schedule = {self.schedule!r}; allowed: 1, or "
                    "schedule = 'interleaved'"
                )

    @staticmethod
    def check_run(config: Config, run: Any) -> None:
        """The cut and the micro-batch count, before launch (``pp_split``); zero bubble without data parallel layouts."""
        pp = run.parallel.sizes.get(DIM)
        if not isinstance(pp, int) or pp < 1:
            return
        names = [layout.name for layout in run.layouts]
        if config.schedule == "zb-h1" and (clash := [n for n in names if n in DATA_PARALLEL_LAYOUTS]):
            raise UserError(
                f"parallel.pp.schedule = 'zb-h1' with layout {clash[0]!r}: deferred weight gradients bypass its "
                "gradient hooks; allowed: schedule = '1f1b' or 'interleaved' with it, or zb-h1 with pp, tp, cp"
            )
        if config.schedule == "interleaved" and "ddp" in names:
            raise UserError(
                "parallel.pp.schedule = 'interleaved' with layout 'ddp': ddp's buckets mix the chunks of a rank, "
                "whose last backwards come apart; allowed: schedule = '1f1b' with ddp, or interleaved with fsdp"
            )
        layers = getattr(getattr(run.model, "config", None), "num_layers", None)
        if isinstance(layers, int):
            stage_counts(
                layers,
                pp,
                config.virtual_stages,
                split=config.split,
                first_stage_layers=config.first_stage_layers,
                last_stage_layers=config.last_stage_layers,
            )
        dp = 1
        for dim in ("dp_replicate", "dp_shard"):
            size = run.parallel.sizes.get(dim, 1)
            if not isinstance(size, int) or size < 1:
                return  # filled at launch: the count is not known yet
            dp *= size
        mbs = run.train.micro_batch_size
        rows = run.train.global_batch_size // dp
        check_micro_batches(rows // mbs if mbs else 1, pp, config.schedule)

    def stage_plan(self, size: int, layers: int, micro_batches: int) -> list[StagePlan]:
        """What each of the ``size`` ranks holds and keeps in flight (``ScheduledLayout``; ``mcore plan``):
        its chunks' layers from the split, the peak of (micro-batch, chunk) forwards awaiting their backward
        from the schedule's simulated timeline."""
        cfg, v = self.config, self.config.virtual_stages
        counts = stage_counts(
            layers,
            size,
            v,
            split=cfg.split,
            first_stage_layers=cfg.first_stage_layers,
            last_stage_layers=cfg.last_stage_layers,
        )
        ranges, stages = stage_ranges(counts), size * v
        m = micro_batches if cfg.schedule != "interleaved" else -(-micro_batches // size) * size
        timeline = simulate(
            with_comms(build(cfg.schedule, size, m, v), size, stages),
            unit_costs(cfg.schedule, v),
            stages=stages,
            micro_batches=m,
        )
        return [
            StagePlan(
                rank=rank,
                chunks=tuple(tuple(ranges[s]) for s in rank_stages(rank, size, v)),
                first=0 in rank_stages(rank, size, v),
                last=stages - 1 in rank_stages(rank, size, v),
                in_flight=timeline.peak_activations[rank],
            )
            for rank in range(size)
        ]

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or type(self).Config()
        self._mesh: ParallelMesh | None = None
        self._module: nn.Module | None = None
        self._stages: list[int] = []
        self._shared: dict[str, list[int]] = {}  # parameter name -> pp ranks holding a copy
        self._store = WeightGradStore()
        self._layouts: dict[str, bool] | None = None

    # -- apply --------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module:
        cut = getattr(model, "pipeline_stage", None)
        count = getattr(model, "stage_layers", None)
        if not callable(cut) or not callable(count):
            raise UserError(
                f"layout 'pp': model {type(model).__name__} cannot be cut into stages (no stage_layers/pipeline_stage); "
                "allowed: a StagedModel (e.g. gpt)"
            )
        pp, rank, v = mesh.size(DIM), mesh.rank(DIM), self.config.virtual_stages
        cfg = self.config
        counts = stage_counts(
            int(count()),
            pp,
            v,
            split=cfg.split,
            first_stage_layers=cfg.first_stage_layers,
            last_stage_layers=cfg.last_stage_layers,
        )
        ranges, total = stage_ranges(counts), pp * v
        self._stages = rank_stages(rank, pp, v)
        chunks = [cut(ranges[s], first=s == 0, last=s == total - 1) for s in self._stages]
        module: nn.Module = chunks[0] if v == 1 else StageChunks(chunks)
        if cfg.schedule == "zb-h1":
            defer_linears(module, self._store)
        self._mesh, self._module = mesh, module
        self._shared = _shared_names(module, mesh)
        return module

    # -- the step -------------------------------------------------------------------------------------
    def forward_backward(
        self,
        model: nn.Module,
        micro_batches: Sequence[MicroBatch],
        *,
        precision: PrecisionRecipe,
        no_grad_sync: Callable[[], AbstractContextManager[None]],
    ) -> torch.Tensor:
        return self._run(model, micro_batches, precision, no_grad_sync)

    def forward_only(
        self, model: nn.Module, micro_batches: Sequence[MicroBatch], *, precision: PrecisionRecipe
    ) -> torch.Tensor:
        return self._run(model, micro_batches, precision, None)

    def schedule_actions(self, micro_batches: int, backward: bool = True) -> list[list[Action]]:
        """Every rank's list for a step of ``micro_batches`` (with transfers); forwards only for evaluation."""
        pp, v = self._require_mesh().size(DIM), self.config.virtual_stages
        compute = build(self.config.schedule, pp, micro_batches, v) if backward else forwards_only(pp, micro_batches, v)
        return with_comms(compute, pp, pp * v)

    def _run(
        self,
        model: nn.Module,
        micro_batches: Sequence[MicroBatch],
        precision: Any,
        no_grad_sync: Callable[[], AbstractContextManager[None]] | None,
    ) -> torch.Tensor:
        mesh = self._require_mesh()
        pp, rank = mesh.size(DIM), mesh.rank(DIM)
        n, total_stages, backward = len(micro_batches), pp * self.config.virtual_stages, no_grad_sync is not None
        device = micro_batches[0][0].device
        if backward:
            check_micro_batches(n, pp, self.config.schedule)
        lists = self.schedule_actions(n, backward)
        incoming = {src: msgs for (src, dst), msgs in channel_orders(lists).items() if dst == rank}
        comm = StageComm(mesh.group(DIM), rank, device, incoming)
        last_backward = {a.stage: (a.kind, a.mb) for a in lists[rank] if a.kind in ("B", "W")}
        state = _StepState()
        total = torch.zeros((), dtype=torch.float32, device=device)
        for action in lists[rank]:
            kind, mb, stage = action.kind, action.mb, action.stage
            if kind == "F":
                part = self._forward(model, micro_batches[mb], mb, stage, total_stages, precision, backward, state)
                total += part / n
            elif kind == "B":
                assert no_grad_sync is not None
                final = last_backward[stage] == ("B", mb)
                with contextlib.nullcontext() if final else no_grad_sync():
                    self._backward(mb, stage, total_stages, n, precision, state)
            elif kind == "W":
                assert no_grad_sync is not None
                with contextlib.nullcontext() if last_backward[stage] == ("W", mb) else no_grad_sync():
                    self._store.apply((mb, stage))
            elif kind == "SEND_F":
                out = state.outputs[(mb, stage)] if backward else state.outputs.pop((mb, stage))
                comm.send(out, action.peer)
            elif kind == "SEND_B":
                comm.send(state.mailbox.pop(("B", mb, stage)), action.peer)
            elif kind == "RECV_F":
                state.mailbox[("F", mb, stage - 1)] = comm.recv(("F", mb, stage - 1), action.peer)
            elif kind == "RECV_B":
                state.mailbox[("B", mb, stage + 1)] = comm.recv(("B", mb, stage + 1), action.peer)
        comm.wait()
        group = mesh.group(DIM)
        if group is not None:
            dist.all_reduce(total, group=group)  # the last stage's losses and every stage's auxiliary losses
        return total

    def _forward(
        self,
        model: nn.Module,
        batch: MicroBatch,
        mb: int,
        stage: int,
        total_stages: int,
        precision: Any,
        backward: bool,
        state: _StepState,
    ) -> torch.Tensor:
        """Run stage ``stage`` on micro-batch ``mb``; its part of the reported loss (before ``/ n``)."""
        tokens, labels, ctx = batch
        first, last = stage == 0, stage == total_stages - 1
        view = dataclasses.replace(ctx, aux_losses=AuxLosses())  # one collector per micro-batch and stage
        if first:
            inputs = tokens
        else:
            inputs = state.mailbox.pop(("F", mb, stage - 1)).detach().requires_grad_(backward)
        kwargs: dict[str, Any] = {"tokens": tokens, "labels": labels if last else None, "ctx": view}
        if isinstance(model, StageChunks):
            kwargs["chunk"] = self._stages.index(stage)
        with precision.autocast(), torch.set_grad_enabled(backward):
            out = model(inputs, **kwargs)
        share = torch.zeros((), dtype=torch.float32, device=tokens.device)
        aux = None
        if not last and view.aux_losses:  # the last stage adds its own; the others are backpropagated here
            aux = torch.stack([a.float() for a in view.aux_losses.values()]).sum() / view.loss_group_size()
            share = share + aux.detach()
        if last:
            share = share + out.detach().float()
        mesh = self._require_mesh()
        local_next = not last and (stage + 1) % mesh.size(DIM) == mesh.rank(DIM)
        if backward:
            state.inputs[(mb, stage)] = inputs
            if aux is not None:
                state.aux[(mb, stage)] = aux
        if backward or not (last or local_next):  # kept for the backward, or until SEND_F
            state.outputs[(mb, stage)] = out
        if local_next:
            state.mailbox[("F", mb, stage)] = out  # the next stage is this rank's: no transfer
        return share

    def _backward(self, mb: int, stage: int, total_stages: int, n: int, precision: Any, state: _StepState) -> None:
        out = state.outputs.pop((mb, stage))
        inputs = state.inputs.pop((mb, stage))
        roots: list[torch.Tensor] = []
        grads: list[torch.Tensor | None] = []
        if stage == total_stages - 1:
            roots.append(precision.scale_loss(out / n))
            grads.append(None)
        else:
            roots.append(out)
            grads.append(state.mailbox.pop(("B", mb, stage + 1)))
        aux = state.aux.pop((mb, stage), None)
        if aux is not None:
            roots.append(precision.scale_loss(aux / n))
            grads.append(None)
        recording = self._store.recording((mb, stage)) if self.config.schedule == "zb-h1" else contextlib.nullcontext()
        with recording:
            torch.autograd.backward(roots, grads)  # type: ignore[arg-type]
        if stage > 0:
            assert inputs.grad is not None, f"pp: stage {stage} input got no gradient"
            state.mailbox[("B", mb, stage)] = inputs.grad

    # -- per step ---------------------------------------------------------------------------------------
    def data_parallel(self) -> DataParallelInfo:
        """Every stage reads the same micro-batches."""
        return DataParallelInfo(rank=0, size=1)

    def no_grad_sync(self) -> AbstractContextManager[None]:
        """Nothing to defer: the tied gradients are summed once, in ``finish_grad_sync``."""
        return contextlib.nullcontext()

    def finish_grad_sync(self) -> None:
        """Sum the gradients of parameters two stages hold (a tied embedding) between their ranks.

        Both copies laid out alike (plain, or the same placements): their local tensors are exchanged.
        Laid out differently (``tp`` splits the last stage's tied head by vocabulary rows but keeps the
        first stage's embedding whole): the full gradients, and each rank keeps its part of the sum."""
        mesh = self._require_mesh()
        if not self._shared or self._module is None:
            return
        params = dict(self._module.named_parameters())
        rank, group = mesh.rank(DIM), mesh.group(DIM)
        assert group is not None  # shared names exist only between two ranks of a group
        layouts = self._alike(params)  # every rank of the group takes part, holder or not
        for name in sorted(n for n, ranks in self._shared.items() if rank in ranks):
            p = params[name]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad
            alike = layouts[name]
            mine = grad.to_local() if alike and isinstance(grad, DTensor) else grad
            mine = mine.full_tensor() if isinstance(mine, DTensor) else mine
            send = mine.contiguous()
            ops, received = [], []
            for peer in self._shared[name]:
                if peer == rank:
                    continue
                buffer = torch.empty(send.shape, dtype=send.dtype, device=send.device)
                received.append(buffer)
                ops.append(dist.P2POp(dist.isend, send, dist.get_global_rank(group, peer), group))
                ops.append(dist.P2POp(dist.irecv, buffer, dist.get_global_rank(group, peer), group))
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            total = send + sum(received[1:], received[0]) if received else send
            if alike or not isinstance(grad, DTensor):
                (grad.to_local() if isinstance(grad, DTensor) else grad).copy_(total.view_as(mine))
            else:
                part = distribute_tensor(total, grad.device_mesh, grad.placements, src_data_rank=None)
                grad.to_local().copy_(part.to_local())

    def _alike(self, params: dict[str, nn.Parameter]) -> dict[str, bool]:
        """Whether the ranks holding each shared name hold it laid out alike (asked once, at the first sync)."""
        if self._layouts is None:
            mesh = self._require_mesh()
            mine = {n: _layout_of(params[n]) for n in self._shared if n in params}
            every: list[Any] = [None] * mesh.size(DIM)
            dist.all_gather_object(every, mine, group=mesh.group(DIM))
            self._layouts = {n: len({str(every[r][n]) for r in ranks}) == 1 for n, ranks in self._shared.items()}
        return self._layouts

    def grad_norm_replicas(self, name: str, param: torch.Tensor) -> int:
        """1 for a stage's own parameters; the number of stages holding a tied one (counted once)."""
        return len(self._shared.get(name, [None]))  # a name this rank holds: its holders include this rank

    def state_dict_options(self) -> dict[str, Any]:
        """Each stage's parameters under the model's names: nothing to tell the checkpoint code."""
        return {}

    @property
    def stages(self) -> tuple[int, ...]:
        """The stages this rank holds."""
        return tuple(self._stages)

    def _require_mesh(self) -> ParallelMesh:
        if self._mesh is None:
            raise RuntimeError(f"layout {self.name!r}: apply() has not been called")
        return self._mesh


def _layout_of(param: torch.Tensor) -> tuple[str, ...]:
    """How a parameter is laid out on this rank: plain, or a DTensor's placements and local shape."""
    if isinstance(param, DTensor):
        return (
            "dtensor",
            str(param.placements),
            str(tuple(param.to_local().shape)),
            str(param.device_mesh.mesh_dim_names),
        )
    return ("plain", str(tuple(param.shape)))


def _shared_names(module: nn.Module, mesh: ParallelMesh) -> dict[str, list[int]]:
    """Parameter names more than one rank of ``pp`` holds, with those ranks."""
    group = mesh.group(DIM)
    if group is None:
        return {}
    names = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    every: list[Any] = [None] * mesh.size(DIM)
    dist.all_gather_object(every, names, group=group)
    holders: dict[str, list[int]] = {}
    for rank, stage_names in enumerate(every):
        for name in stage_names:
            holders.setdefault(name, []).append(rank)
    return {name: ranks for name, ranks in holders.items() if len(ranks) > 1}  # the same map on every rank
