"""``distributed-adamw``: ZeRO-1, AdamW with its state sharded over the data-parallel ranks.

Replicated data parallelism (plain-tensor parameters, one layout with DP size > 1) through a layout that
reduce-scatters gradients for the optimizer (``GradientShardingLayout``, e.g. ``ddp``; the core's handshake
``mcore.protocols.sharded_grads``): the factory asks it for this rank's pieces (``shard_grads()``) and builds
``zero_pieces.PiecesAdamW``, which updates those elements only and ends each step with the layout's
``gather_params()``; the layout owns the storage, the reduce-scatter and the all-gather. ``reduce_grads = True``
is then ignored with a warning (the layout's bucketed reduce-scatter already leaves each rank its range).

Through any other data-parallel layout, or one that declines (``shard_grads()`` answers ``None``), this module's
``DistributedAdamW``:

* all parameters, in ``named_parameters`` order, are laid end to end in one virtual flat
  vector of ``N`` elements, padded to ``P = size * ceil(N / size)``; rank ``r`` owns the
  contiguous range ``[r P/size, (r+1) P/size)``; a strided parameter (a view of a packed buffer,
  e.g. the MoE experts' gate and up) is given contiguous storage of its own first (its module then
  concatenates the two per call, as it does for any unpacked layout);
* its moments live in two contiguous fp32 buffers of that length; fp32 master copies are
  kept for the owned pieces of low-precision parameters (an fp32 parameter's owned piece is
  updated in place);
* gradients: by default the layout has already averaged them (``finish_grad_sync``), and
  each rank reads only its range. With ``reduce_grads = True`` the optimizer takes over the
  reduction: the layout must leave gradients un-reduced (e.g. run every backward inside
  its ``no_grad_sync()``), and ``step()`` reduce-scatters them (sum / size) so each rank
  receives only its range: half the traffic of an all-reduce;
* after the update the owned ranges are all-gathered and copied into the parameters;
* ``state_dict()`` re-shards the state by rows with one ``all_to_all``: each parameter's
  moments (and master) become ``DTensor``s ``Shard(0)`` over the DP group, as FSDP lays
  them out, so no rank ever holds more than its share and DCP reshards on load.

Under FSDP (``DTensor`` parameters) the parameters and state are sharded already: the
factory returns plain ``adamw`` (its sharded update). With no data parallelism it returns
``adamw`` too. The state dict is ``adamw``'s format (per-name, row-sharded ``DTensor``s;
``PiecesAdamW`` saves each tensor flat, as the handshake's checkpoint format asks, and every
optimizer here loads either form: ``state``), so checkpoints move freely between them and across
DP sizes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from mcore.protocols.sharded_grads import grad_sharding_layout
from mcore.ragged import even_counts
from mcore_optim import state as state_format
from mcore_optim.adamw import AdamW, AdamWFactory, adamw_state_bytes, use_fused, use_triton
from mcore_optim.adamw_math import adamw_step
from mcore_optim.dist import all_gather_flat, counts_of, data_parallel, is_dtensor, reduce_scatter_flat, whole
from mcore_optim.groups import make_groups, zero_grad
from mcore_optim.roles import NamedParam, classify
from mcore_optim.zero_pieces import PiecesAdamW

if TYPE_CHECKING:
    from torch import nn

    from mcore.mesh import ParallelMesh
    from mcore.params import ParamSpec
    from mcore.protocols.layout import DataParallelInfo, ParallelLayout


@dataclass(frozen=True, slots=True)
class Segment:
    """The piece ``[lo, hi)`` of a parameter's flat view that this rank owns, at ``at`` in its shard."""

    name: str
    param: torch.Tensor
    lo: int
    hi: int
    at: int


class DistributedAdamW:
    """The ``MeshOptimizer`` of ``distributed-adamw`` under replicated data parallelism."""

    algorithm: ClassVar[str] = "adamw"

    def __init__(
        self,
        named: Sequence[NamedParam],
        *,
        settings: Mapping[str, Mapping[str, float]],
        betas: tuple[float, float],
        eps: float,
        fused: bool,
        dp: DataParallelInfo,
        reduce_grads: bool,
    ) -> None:
        self._named = list(named)
        self.param_groups = make_groups(self._named, settings)
        self.betas, self.eps, self.fused = betas, eps, fused
        self.reduce_grads = reduce_grads
        self.rank, self.size, self.group = dp.rank, dp.size, dp.group
        for n in self._named:
            if n.param.dim() == 0:
                raise ValueError(f"distributed-adamw needs parameters of 1 or more dims; {n.name!r} is 0-d")
            if not n.param.is_contiguous():  # a view of a packed buffer: a storage of its own (flat views below)
                n.param.data = n.param.detach().contiguous()
        self.device = self._named[0].param.device
        dtypes = {n.param.dtype for n in self._named}
        self.gather_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        # Flat layout: parameter name -> (start, numel) in the virtual flat vector.
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for n in self._named:
            self.offsets[n.name] = (start, n.param.numel())
            start += n.param.numel()
        self.numel = start
        self.shard = -(-start // self.size)  # ceil: P / size
        lo, hi = self.rank * self.shard, (self.rank + 1) * self.shard
        self.segments: dict[str, Segment] = {}
        for n in self._named:
            p_start, p_numel = self.offsets[n.name]
            a, b = max(lo, p_start), min(hi, p_start + p_numel)
            if a < b:
                self.segments[n.name] = Segment(n.name, n.param, a - p_start, b - p_start, a - lo)
        self.exp_avg = torch.zeros(self.shard, dtype=torch.float32, device=self.device)
        self.exp_avg_sq = torch.zeros(self.shard, dtype=torch.float32, device=self.device)
        self.steps = {n.name: torch.zeros((), dtype=torch.float32, device=self.device) for n in self._named}
        self._device_mesh: DeviceMesh | None = None
        # Parameters overlapping each rank's contiguous range (a run of consecutive ones).
        self._overlapping = [
            [n for n in self._named if self._flat(n, r)[0] < self._flat(n, r)[1]] for r in range(self.size)
        ]
        with torch.no_grad():
            self.masters = {
                s.name: s.param.detach().reshape(-1)[s.lo : s.hi].to(torch.float32, copy=True)
                for s in self.segments.values()
                if s.param.dtype != torch.float32
            }

    def _weight(self, s: Segment) -> torch.Tensor:
        """The fp32 values this rank updates for segment ``s`` (master copy, or the parameter itself)."""
        return self.masters[s.name] if s.name in self.masters else s.param.detach().view(-1)[s.lo : s.hi]

    def _shard_grads(self) -> torch.Tensor | None:
        """This rank's range of the summed-then-averaged gradients (``reduce_grads`` only)."""
        flat = torch.zeros(self.shard * self.size, dtype=torch.float32, device=self.device)
        for n in self._named:
            if n.param.grad is not None:
                start, numel = self.offsets[n.name]
                flat[start : start + numel].copy_(n.param.grad.reshape(-1))
        out = torch.empty(self.shard, dtype=torch.float32, device=self.device)
        reduce_scatter_flat(out, flat, self.group)
        return out.div_(self.size)

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        reduced = self._shard_grads() if self.reduce_grads else None
        for group in self.param_groups:
            weights, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for name, p in zip(group["names"], group["params"]):
                s = self.segments.get(name)
                if s is None or p.grad is None:
                    continue
                width = s.hi - s.lo
                if reduced is not None:
                    grads.append(reduced[s.at : s.at + width])
                else:
                    grads.append(p.grad.reshape(-1)[s.lo : s.hi].to(torch.float32))
                weights.append(self._weight(s))
                exp_avgs.append(self.exp_avg[s.at : s.at + width])
                exp_avg_sqs.append(self.exp_avg_sq[s.at : s.at + width])
                steps.append(self.steps[name])
            adamw_step(
                weights,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=self.eps,
                weight_decay=float(group["weight_decay"]),
                fused=self.fused,
            )
            for name, p in zip(group["names"], group["params"]):  # steps of parameters this rank holds none of
                if name not in self.segments and p.grad is not None:
                    self.steps[name].add_(1.0)
        self._all_gather_params()

    def _gather(self, shard: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.shard * self.size, dtype=shard.dtype, device=self.device)
        all_gather_flat(out, shard.contiguous(), self.group)
        return out

    def _owned_weights(self, dtype: torch.dtype) -> torch.Tensor:
        shard = torch.zeros(self.shard, dtype=dtype, device=self.device)
        for s in self.segments.values():
            shard[s.at : s.at + s.hi - s.lo].copy_(self._weight(s))
        return shard

    def _all_gather_params(self) -> None:
        flat = self._gather(self._owned_weights(self.gather_dtype))
        for n in self._named:
            start, numel = self.offsets[n.name]
            n.param.detach().view(-1).copy_(flat[start : start + numel])

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grad(self.param_groups, set_to_none)

    # -- state: adamw's format, each parameter's state row-sharded like FSDP ------------
    def _mesh(self) -> DeviceMesh:
        if self._device_mesh is None:
            assert self.group is not None, "distributed-adamw runs only with a data-parallel group"
            self._device_mesh = DeviceMesh.from_group(self.group, self.device.type)
        return self._device_mesh

    def _rows(self, n: NamedParam, rank: int) -> tuple[int, int]:
        """Element range ``[lo, hi)`` of ``n``'s flat view in ``rank``'s row chunk (``torch.chunk`` rows)."""
        rows = n.param.shape[0]
        width = n.param.numel() // rows if rows else 0
        chunk = -(-rows // self.size)
        return min(rank * chunk, rows) * width, min((rank + 1) * chunk, rows) * width

    def _flat(self, n: NamedParam, rank: int) -> tuple[int, int]:
        """Element range ``[lo, hi)`` of ``n``'s flat view inside ``rank``'s contiguous ZeRO range."""
        start, numel = self.offsets[n.name]
        return max(0, rank * self.shard - start), min(numel, (rank + 1) * self.shard - start)

    def _ranges(self, src: int, dst: int) -> list[tuple[NamedParam, int, int]]:
        """Pieces that ``src`` holds in the ZeRO layout and ``dst`` holds in the row layout, in model order."""
        out = []
        for n in self._overlapping[src]:
            a0, a1 = self._flat(n, src)
            b0, b1 = self._rows(n, dst)
            lo, hi = max(a0, b0), min(a1, b1)
            if lo < hi:
                out.append((n, lo, hi))
        return out

    def _to_rows(self, shard: torch.Tensor) -> dict[str, torch.Tensor]:
        """ZeRO shard (S, c) -> each parameter's row chunk on this rank (flat, (rows_here * width, c)).

        One ``all_to_all``: every rank sends each other rank the pieces of its contiguous range
        that fall in that rank's row chunks.
        """
        base = self.rank * self.shard
        sends = [self._ranges(self.rank, d) for d in range(self.size)]
        recvs = [self._ranges(s, self.rank) for s in range(self.size)]
        pieces = [
            shard[self.offsets[n.name][0] + lo - base : self.offsets[n.name][0] + hi - base]
            for plan in sends
            for n, lo, hi in plan
        ]
        send = torch.cat(pieces) if pieces else shard.new_empty((0, *shard.shape[1:]))
        recv = shard.new_empty((sum(hi - lo for plan in recvs for _, lo, hi in plan), *shard.shape[1:]))
        dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=[sum(hi - lo for _, lo, hi in plan) for plan in recvs],
            input_split_sizes=[sum(hi - lo for _, lo, hi in plan) for plan in sends],
            group=self.group,
        )
        out = {}
        for n in self._named:
            lo, hi = self._rows(n, self.rank)
            out[n.name] = shard.new_zeros((hi - lo, *shard.shape[1:]))
        at = 0
        for plan in recvs:
            for n, lo, hi in plan:
                first = self._rows(n, self.rank)[0]
                out[n.name][lo - first : hi - first].copy_(recv[at : at + hi - lo])
                at += hi - lo
        return out

    def _from_rows(self, chunks: Mapping[str, torch.Tensor], columns: int) -> torch.Tensor:
        """Inverse of ``_to_rows``: each parameter's row chunk here (flat, (n, c)) -> this rank's ZeRO shard (S, c)."""
        sends = [self._ranges(d, self.rank) for d in range(self.size)]  # my row pieces that d holds in ZeRO
        recvs = [self._ranges(self.rank, s) for s in range(self.size)]
        pieces = []
        for plan in sends:
            for n, lo, hi in plan:
                first = self._rows(n, self.rank)[0]
                pieces.append(chunks[n.name][lo - first : hi - first])
        send = torch.cat(pieces) if pieces else self.exp_avg.new_empty((0, columns))
        recv = self.exp_avg.new_empty((sum(hi - lo for plan in recvs for _, lo, hi in plan), columns))
        dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=[sum(hi - lo for _, lo, hi in plan) for plan in recvs],
            input_split_sizes=[sum(hi - lo for _, lo, hi in plan) for plan in sends],
            group=self.group,
        )
        shard = self.exp_avg.new_zeros((self.shard, columns))
        base, at = self.rank * self.shard, 0
        for plan in recvs:
            for n, lo, hi in plan:
                begin = self.offsets[n.name][0] + lo - base
                shard[begin : begin + hi - lo].copy_(recv[at : at + hi - lo])
                at += hi - lo
        return shard

    @torch.no_grad()
    def state_dict(self) -> dict[str, Any]:
        """``adamw``'s format; each parameter's state is a ``DTensor`` sharded by rows over the DP
        group (as FSDP would shard it), so DCP reshards it under any layout and DP size."""
        columns = [self.exp_avg, self.exp_avg_sq, self._owned_weights(torch.float32)]
        rows = self._to_rows(torch.stack(columns, dim=1))  # name -> (rows_here * width, 3)
        mesh = self._mesh()
        entries: dict[str, dict[str, torch.Tensor]] = {}
        for n in self._named:
            chunk = rows[n.name]
            local_shape = (chunk.shape[0] // max(1, n.param.numel() // n.param.shape[0]), *n.param.shape[1:])

            def dtensor(i: int, n: NamedParam = n, chunk: torch.Tensor = chunk, local_shape: Any = local_shape) -> Any:
                piece = chunk[:, i].contiguous().view(local_shape)
                return DTensor.from_local(piece, mesh, [Shard(0)], shape=n.param.shape, stride=n.param.stride())

            entries[n.name] = {"step": self.steps[n.name].clone(), "exp_avg": dtensor(0), "exp_avg_sq": dtensor(1)}
            if n.param.dtype != torch.float32:
                entries[n.name]["master"] = dtensor(2)
        return {**state_format.header(self.algorithm, self._named, self.param_groups), "state": entries}

    def _check_entry(self, n: NamedParam, key: str, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"saved optimizer state {n.name!r}.{key!r} is a {type(value).__name__}, expected a tensor")
        if tuple(value.shape) != tuple(n.param.shape) and not state_format.is_flat(value, n.param.shape):
            raise ValueError(
                f"saved optimizer state {n.name!r}.{key!r} has shape {state_format.shape_text(value.shape)}, "
                f"expected {state_format.shape_text(n.param.shape)}; refusing to load"
            )
        return value

    def _row_chunk(self, n: NamedParam, value: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        """This rank's row chunk (flat) of a saved per-parameter tensor: a DTensor split like ours (by
        its real row ``counts``), any other DTensor (gathered, ragged splits included; a flat one too), or a
        full one."""
        lo, hi = self._rows(n, self.rank)
        if isinstance(value, DTensor):
            if (
                tuple(value.shape) == tuple(n.param.shape)
                and tuple(value.placements) == (Shard(0),)
                and value.device_mesh.size() == self.size
                and counts == even_counts(n.param.shape[0], self.size)
            ):
                return value._local_tensor.reshape(-1).to(device=self.device, dtype=torch.float32)
            value = whole(value, counts)
        return value.reshape(-1)[lo:hi].to(device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_format.check(state_dict, self.algorithm, self._named, self.param_groups)
        saved = state_dict["state"]
        steps = {n.name: state_format.take(saved, n.name, "step", self.steps[n.name]) for n in self._named}
        plan: list[tuple[NamedParam, torch.Tensor]] = []  # every check before the first collective
        for n in self._named:
            if n.name not in saved:
                raise ValueError(f"saved optimizer state lacks parameter {n.name!r}; refusing to load")
            keys = ("exp_avg", "exp_avg_sq") + (("master",) if n.param.dtype != torch.float32 else ())
            missing = [k for k in keys if k not in saved[n.name]]
            if missing:
                raise ValueError(
                    f"saved optimizer state lacks {missing[0]!r} for parameter {n.name!r}; refusing to load"
                )
            plan.extend((n, self._check_entry(n, k, saved[n.name][k])) for k in keys)
        counts = counts_of([value for _, value in plan])  # the real row splits (one batched collective)
        columns: dict[str, list[torch.Tensor]] = {}
        for (n, value), split in zip(plan, counts):
            columns.setdefault(n.name, []).append(self._row_chunk(n, value, split))
        chunks: dict[str, torch.Tensor] = {}
        for name, pieces in columns.items():
            if len(pieces) == 2:
                pieces.append(torch.zeros_like(pieces[0]))
            chunks[name] = torch.stack(pieces, dim=1)  # (rows_here * width, 3)
        shard = self._from_rows(chunks, 3)
        for name, value in steps.items():  # only after every check passed
            self.steps[name].copy_(value)
        self.exp_avg.copy_(shard[:, 0])
        self.exp_avg_sq.copy_(shard[:, 1])
        for s in self.segments.values():
            if s.name in self.masters:
                self.masters[s.name].copy_(shard[s.at : s.at + s.hi - s.lo, 2])
        state_format.restore_groups(self.param_groups, state_dict["groups"])


class DistributedAdamWFactory:
    """Registered as optimizer ``distributed-adamw``."""

    @dataclass(kw_only=True, slots=True)
    class Config(AdamWFactory.Config):
        reduce_grads: bool = False
        """True: gradients arrive un-reduced and step() reduce-scatters them (not under FSDP; ignored, with a warning,
        where the layout reduce-scatters them itself, as ddp does)."""

    def __init__(self, config: DistributedAdamWFactory.Config | None = None) -> None:
        self.config = config if config is not None else DistributedAdamWFactory.Config()
        self._adamw = AdamWFactory(self.config)

    def settings(self) -> dict[str, dict[str, float]]:
        return self._adamw.settings()

    def build(
        self, model: nn.Module, *, mesh: ParallelMesh, layouts: Sequence[ParallelLayout]
    ) -> PiecesAdamW | DistributedAdamW | AdamW:
        named = classify(model, role_overrides=self.config.role_overrides)
        if any(is_dtensor(n.param) for n in named):
            if self.config.reduce_grads:
                raise ValueError(
                    "reduce_grads = True, but the parameters are DTensors (FSDP reduces their gradients); "
                    "allowed: False under FSDP"
                )
            return self._adamw.make(named)
        dp = data_parallel(layouts, optimizer="distributed-adamw")
        if dp.size == 1:
            if self.config.reduce_grads:
                warnings.warn(
                    "reduce_grads = True is ignored: there is no data parallelism (no layout reports a "
                    "data-parallel size above 1), so there are no gradients to reduce",
                    UserWarning,
                    stacklevel=2,
                )
            return self._adamw.make(named)
        if not self.config.master_weights:
            warnings.warn(
                "master_weights = False is ignored by distributed-adamw: it keeps fp32 masters for the "
                "pieces of low-precision parameters its rank owns",
                UserWarning,
                stacklevel=2,
            )
        pieces = self._pieces(named, layouts, dp)
        if pieces is not None:
            return pieces
        return DistributedAdamW(
            named,
            settings=self.settings(),
            betas=self._adamw.betas,
            eps=self.config.eps,
            fused=use_fused(self.config.impl, named),
            dp=dp,
            reduce_grads=self.config.reduce_grads,
        )

    def _pieces(
        self, named: Sequence[NamedParam], layouts: Sequence[ParallelLayout], dp: DataParallelInfo
    ) -> PiecesAdamW | None:
        """ZeRO-1 on the pieces of the layout that reduce-scatters gradients for the optimizer, or ``None`` where no
        layout offers it or the one that does declines (then ``DistributedAdamW``)."""
        layout = grad_sharding_layout(layouts)
        shards = layout.shard_grads() if layout is not None else None
        if layout is None or shards is None:
            return None
        if shards.size != dp.size:
            raise ValueError(
                f"layout {layout.name!r} shards gradients over {shards.size} ranks, but the data-parallel size is "
                f"{dp.size}; allowed: the layout that reduce-scatters gradients is the data-parallel one"
            )
        given = {piece.name: piece.param for piece in shards.pieces}
        missing = next((n.name for n in named if given.get(n.name) is not n.param), None)
        if missing is not None:
            raise ValueError(
                f"layout {layout.name!r} hands distributed-adamw no piece of trainable parameter {missing!r} (or one "
                "of another tensor under its name); allowed: a layout whose pieces name every trainable parameter"
            )
        if self.config.reduce_grads:
            warnings.warn(
                f"reduce_grads = True is ignored: layout {layout.name!r} reduce-scatters the gradients itself "
                "(mcore.protocols.sharded_grads), so each rank receives only its range already; set reduce_grads = false",
                UserWarning,
                stacklevel=3,
            )
        return PiecesAdamW(
            named,
            shards=shards,
            layout=layout,
            settings=self.settings(),
            betas=self._adamw.betas,
            eps=self.config.eps,
            fused=use_fused(self.config.impl, named),
            triton=use_triton(self.config.impl, named),
        )

    # -- OptimizerStateSize (read by ``mcore plan``) -----------------------------------------
    def state_bytes(self, shape: tuple[int, ...], spec: ParamSpec, *, param_dtype: torch.dtype) -> int:
        """AdamW's state with fp32 moments and an fp32 master copy of low-precision parameters (what
        the sharded path keeps whatever ``master_weights`` says)."""
        return adamw_state_bytes(shape, param_dtype, master_weights=True)

    def shards_state_over_dp(self, *, sharded_params: bool) -> bool:
        """Split over the replicas of replicated parameters; under FSDP it is plain ``adamw``."""
        return not sharded_params
